#!/usr/bin/env node
// A minimal Node.js reader of annstream neighbour records, decoded by the layout in
// schemas/neighbour_record.md (format 1) with nothing from annstream.
//
//   node reader.js --store aerospike://host:port/namespace/set [--k K] QUERY_ID...
//
// prints one JSON object per query id, in the order given: its first K neighbours (padding
// skipped) with their scores, and the campaign / advertiser ids when the record has them.
// Ids are int64: they are read as BigInt and printed as exact JSON integers.
'use strict'

const Aerospike = require('aerospike')

const FORMAT = 1
const NOT_FOUND = 2

function int64s (buf, name) {
  if (buf.length % 8 !== 0) throw new Error(`bin ${name} is not a whole number of int64`)
  const out = new Array(buf.length / 8)
  for (let i = 0; i < out.length; i++) out[i] = buf.readBigInt64LE(8 * i)
  return out
}

function float32s (buf, name) {
  if (buf.length % 4 !== 0) throw new Error(`bin ${name} is not a whole number of float32`)
  const out = new Array(buf.length / 4)
  for (let i = 0; i < out.length; i++) out[i] = buf.readFloatLE(4 * i)
  return out
}

// The bins of one record -> arrays; throws on a record this reader does not know.
function decodeRecord (bins) {
  if (bins.fmt !== FORMAT) {
    throw new Error(`neighbour record format ${bins.fmt} is not ${FORMAT}: upgrade the reader`)
  }
  const ids = int64s(bins.ids, 'ids')
  const scores = float32s(bins.sc, 'sc')
  if (ids.length !== scores.length) {
    throw new Error(`neighbour record has ${ids.length} ids but ${scores.length} scores`)
  }
  const optional = (name) => {
    if (bins[name] == null) return null
    const values = int64s(bins[name], name)
    if (values.length !== ids.length) throw new Error(`bin ${name} has ${values.length} ids`)
    return values
  }
  return {
    version: bins.v,
    computedAtMs: bins.at,
    k: bins.k,
    ids,
    scores,
    campaignIds: optional('cmp'),
    advertiserIds: optional('adv')
  }
}

// The first k neighbours, skipping padding (id -1, score -inf).
function firstK (record, k) {
  const rows = []
  for (let i = 0; i < record.ids.length && rows.length < k; i++) {
    if (record.ids[i] >= 0n) rows.push(i)
  }
  const pick = (values) => (values == null ? undefined : rows.map((i) => values[i]))
  return {
    ids: pick(record.ids),
    scores: pick(record.scores),
    campaign_ids: pick(record.campaignIds),
    advertiser_ids: pick(record.advertiserIds)
  }
}

function parseStore (url) {
  const match = /^aerospike:\/\/([^/]+)\/([^/]+)\/([^/]+)$/.exec(url || '')
  if (!match) throw new Error(`--store ${url}: expected aerospike://host:port/namespace/set`)
  const hosts = match[1].split(',').map((seed) => {
    const [addr, port] = seed.split(':')
    return { addr, port: Number(port || 3000) }
  })
  return { hosts, namespace: match[2], set: match[3] }
}

function toJson (value) {
  // BigInt ids become exact JSON integers (JSON.stringify refuses BigInt).
  return JSON.stringify(value, (_, v) => (typeof v === 'bigint' ? `#big#${v}` : v))
    .replace(/"#big#(-?\d+)"/g, '$1')
}

async function lookup (client, store, queryId, k) {
  const key = new Aerospike.Key(store.namespace, store.set, queryId)
  const line = { query_id: queryId, found: false }
  let bins
  try {
    bins = (await client.get(key)).bins
  } catch (error) {
    if (error.code !== NOT_FOUND) line.error = `result ${error.code}: ${error.message}`
    return line
  }
  try {
    const record = decodeRecord(bins)
    return {
      query_id: queryId,
      found: true,
      version: record.version,
      computed_at_ms: record.computedAtMs,
      ...firstK(record, k == null ? record.k : k)
    }
  } catch (error) {
    line.error = error.message
    return line
  }
}

async function main (argv) {
  const args = { ids: [] }
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === '--store') args.store = argv[++i]
    else if (argv[i] === '--k') args.k = Number(argv[++i])
    else args.ids.push(BigInt(argv[i]))
  }
  if (!args.ids.length) throw new Error('usage: reader.js --store aerospike://host:port/ns/set [--k K] QUERY_ID...')
  const store = parseStore(args.store)
  const client = await Aerospike.connect({ hosts: store.hosts, log: { level: Aerospike.log.OFF } })
  try {
    for (const id of args.ids) {
      const queryId = id >= BigInt(Number.MIN_SAFE_INTEGER) && id <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(id) : id
      process.stdout.write(toJson(await lookup(client, store, queryId, args.k)) + '\n')
    }
  } finally {
    await client.close()
  }
}

module.exports = { decodeRecord, firstK }

if (require.main === module) {
  main(process.argv.slice(2)).catch((error) => {
    process.stderr.write(`reader.js: ${error.message}\n`)
    process.exit(2)
  })
}
