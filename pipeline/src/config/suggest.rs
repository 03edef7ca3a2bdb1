//! "Did you mean `x`?" for a misspelt key, stage type or value: the closest of the names
//! an error message says it expected, by edit distance.

/// The candidate nearest `word`, if near enough to be a typo: at most one edit for short
/// words, about a third of the word's length for longer ones. Swapping two neighbouring
/// letters counts as one edit (`craete`).
pub(crate) fn closest<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).max(1);
    candidates
        .into_iter()
        .filter(|c| *c != word)
        .map(|c| (edit_distance(word, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Optimal string alignment distance: insertions, deletions, substitutions and swaps of
/// neighbours, each costing one.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let width = b.len() + 1;
    let mut d = vec![0usize; (a.len() + 1) * width];
    for i in 0..=a.len() {
        for j in 0..=b.len() {
            d[i * width + j] = if i == 0 || j == 0 {
                i + j
            } else {
                let cost = usize::from(a[i - 1] != b[j - 1]);
                let mut best = (d[(i - 1) * width + j] + 1)
                    .min(d[i * width + j - 1] + 1)
                    .min(d[(i - 1) * width + j - 1] + cost);
                if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                    best = best.min(d[(i - 2) * width + j - 2] + 1);
                }
                best
            };
        }
    }
    d[a.len() * width + b.len()]
}

/// Serde's "unknown field `x`, expected one of `a`, `b`" (or "unknown variant", or
/// "expected `a` or `b`") with "; did you mean `a`?" when one of them is near `x`.
pub(crate) fn with_suggestion(message: String) -> String {
    let Some(rest) = ["unknown field `", "unknown variant `"]
        .iter()
        .find_map(|prefix| message.strip_prefix(prefix))
    else {
        return message;
    };
    let Some((word, tail)) = rest.split_once('`') else {
        return message;
    };
    let Some((_, expected)) = tail.split_once("expected") else {
        return message;
    };
    let candidates = expected.split('`').skip(1).step_by(2);
    match closest(word, candidates) {
        Some(near) => format!("{message}; did you mean `{near}`?"),
        None => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_typo_gets_the_nearest_name_and_a_stranger_gets_none() {
        let keys = ["tombstone_prefix", "timeout", "pool_size"];
        assert_eq!(closest("tombstone_prefx", keys), Some("tombstone_prefix"));
        assert_eq!(closest("timout", keys), Some("timeout"));
        assert_eq!(closest("craete", ["create", "table"]), Some("create"));
        assert_eq!(closest("form", ["type", "from"]), Some("from"));
        assert_eq!(closest("colour", keys), None);
    }

    #[test]
    fn serde_messages_get_the_hint_others_stay_as_they_are() {
        assert_eq!(
            with_suggestion(
                "unknown field `tombstone_prefx`, expected one of `redis`, `key`, `tombstone_prefix`".into()
            ),
            "unknown field `tombstone_prefx`, expected one of `redis`, `key`, `tombstone_prefix`; did you mean `tombstone_prefix`?"
        );
        assert_eq!(
            with_suggestion("unknown field `form`, expected `type` or `from`".into()),
            "unknown field `form`, expected `type` or `from`; did you mean `from`?"
        );
        assert_eq!(
            with_suggestion("unknown variant `txt`, expected one of `text`, `bigint`".into()),
            "unknown variant `txt`, expected one of `text`, `bigint`; did you mean `text`?"
        );
        let unrelated = "unknown field `zzzzzz`, expected `type` or `from`";
        assert_eq!(with_suggestion(unrelated.into()), unrelated);
        assert_eq!(with_suggestion("invalid type".into()), "invalid type");
    }
}
