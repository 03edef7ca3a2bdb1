#!/usr/bin/env node
// The partition of an ecst event: FNV-1a 32 of aggregateId's UTF-8 bytes, mod N.
//
// Usage: node partition.js ID N [ID N ...]   or   one `ID<TAB>N` a line on standard input.
// Prints `<id>\t<hash hex>\t<N>\t<partition>` for each; the key to XADD to is
// `S:{S:<partition>}` for a stream S with N > 1 partitions, and S itself for N = 1.
'use strict';

function fnv1a32(aggregateId) {
  let h = 0x811c9dc5;
  for (const byte of Buffer.from(aggregateId, 'utf8')) {
    h = Math.imul(h ^ byte, 0x01000193) >>> 0;
  }
  return h;
}

function partitionOf(aggregateId, n) {
  return n > 1 ? fnv1a32(aggregateId) % n : 0;
}

function print(pairs) {
  for (const [aggregateId, count] of pairs) {
    const n = Number(count);
    const hash = fnv1a32(aggregateId).toString(16).padStart(8, '0');
    process.stdout.write(`${aggregateId}\t${hash}\t${n}\t${partitionOf(aggregateId, n)}\n`);
  }
}

module.exports = { fnv1a32, partitionOf };

if (require.main === module) {
  const args = process.argv.slice(2);
  if (args.length > 0) {
    const pairs = [];
    for (let i = 0; i + 1 < args.length; i += 2) pairs.push([args[i], args[i + 1]]);
    print(pairs);
  } else {
    let input = '';
    process.stdin.setEncoding('utf8');
    process.stdin.on('data', (chunk) => { input += chunk; });
    process.stdin.on('end', () => {
      const pairs = input.split('\n').filter((line) => line !== '').map((line) => {
        const tab = line.lastIndexOf('\t');
        return [line.slice(0, tab), line.slice(tab + 1)];
      });
      print(pairs);
    });
  }
}
