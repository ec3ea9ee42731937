#!/usr/bin/env node
// An outside consumer of the SANDBOXER stream, written without sand-boxer's Python
// types: a durable pull consumer with explicit acks on `sandboxer.>` that checks each
// message against the published contract and prints a JSON summary on stdout.
//
//   node consume.mjs --url nats://127.0.0.1:4223 [--user U --password P]
//        --stream SANDBOXER --schema events.schema.json --subjects events.subjects.json
//        [--durable NAME] [--until-seq N] [--nak-first] [--timeout SECONDS]
//
// Per message: the payload must validate against the schema (Ajv, draft 2020-12,
// strict mode, formats checked); the subject must be `sandboxer.<kind>.<token>.<Type>`
// with the kind's token rule, the token equal to `aggregate_id` and <Type> equal to
// `type` (or `sandboxer.deadletter.<durable>`, whose header Sandboxer-Subject must
// obey the same rule). Delivery is at least once: events are counted once per
// `event_id`. With --nak-first the first message is refused once, so the summary
// shows a redelivery. Reads until every stream sequence up to --until-seq (default:
// the stream's last sequence when it starts) has been acked.
import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";

import Ajv2020 from "ajv/dist/2020.js";
import addFormats from "ajv-formats";
import { AckPolicy, DeliverPolicy, connect, nanos } from "nats";

const { values: args } = parseArgs({
  options: {
    url: { type: "string" },
    user: { type: "string" },
    password: { type: "string" },
    stream: { type: "string", default: "SANDBOXER" },
    schema: { type: "string" },
    subjects: { type: "string" },
    durable: { type: "string", default: "contract-validator" },
    "until-seq": { type: "string" },
    "nak-first": { type: "boolean", default: false },
    timeout: { type: "string", default: "60" },
  },
});

const schema = JSON.parse(readFileSync(args.schema, "utf8"));
const subjects = JSON.parse(readFileSync(args.subjects, "utf8"));

// Strict: unknown keywords, formats or ambiguous types in the schema are errors.
const ajv = new Ajv2020({ strict: true, allErrors: true });
addFormats(ajv);
const validate = ajv.compile(schema);
const byType = new Map(); // a readable error: the type's own definition
function explain(payload) {
  const name = payload?.type;
  const version = payload?.schema_version;
  const current = subjects.types[name];
  if (!current) return [{ message: `unknown type ${JSON.stringify(name)}` }];
  const def = version === current.schema_version ? name : `${name}V${version}`;
  if (!schema.$defs[def]) return [{ message: `${name}: no schema for version ${version}` }];
  if (!byType.has(def)) {
    const { oneOf, ...rest } = schema;
    byType.set(def, ajv.compile({ ...rest, $ref: `#/$defs/${def}` }));
  }
  const check = byType.get(def);
  check(payload);
  return check.errors ?? validate.errors;
}

const tokenRules = Object.fromEntries(
  Object.entries(subjects.kinds).map(([kind, k]) => [kind, new RegExp(k.token_pattern)]),
);
const durableRule = new RegExp(subjects.deadletter.token_pattern);

function subjectProblem(subject, payload) {
  const parts = subject.split(".");
  if (parts[0] !== "sandboxer") return "not under sandboxer.";
  if (parts.length !== 4) return `${parts.length} tokens, not sandboxer.<kind>.<token>.<Type>`;
  const [, kind, token, type] = parts;
  if (!tokenRules[kind]) return `unknown kind ${kind}`;
  if (!tokenRules[kind].test(token)) return `token ${token} breaks ${subjects.kinds[kind].token_pattern}`;
  if (type !== payload.type) return `last token ${type} is not the type ${payload.type}`;
  if (token !== payload.aggregate_id) return `token ${token} is not aggregate_id ${payload.aggregate_id}`;
  if (subjects.types[type]?.kind !== kind) return `${type} is not a ${kind} event`;
  return null;
}

const connectOptions = { servers: args.url, name: "contract-validator" };
if (args.user) Object.assign(connectOptions, { user: args.user, pass: args.password });
const nc = await connect(connectOptions);
const jsm = await nc.jetstreamManager();
const until = Number(args["until-seq"] ?? (await jsm.streams.info(args.stream)).state.last_seq);
await jsm.consumers.add(args.stream, {
  durable_name: args.durable,
  ack_policy: AckPolicy.Explicit,
  deliver_policy: DeliverPolicy.All,
  filter_subject: "sandboxer.>",
  ack_wait: nanos(30_000),
});
const consumer = await nc.jetstream().consumers.get(args.stream, args.durable);

const summary = {
  until_seq: until,
  deliveries: 0,
  redeliveries: 0,
  events: 0, // distinct event_id on event subjects
  deadletters: 0,
  types: {},
  versions: {},
  payload_failures: [],
  subject_failures: [],
  duplicate_event_ids: [],
};
const seen = new Map(); // event_id -> stream sequence
const acked = new Set();
let refused = !args["nak-first"];
const deadline = Date.now() + Number(args.timeout) * 1000;

function check(m) {
  let payload;
  try {
    payload = JSON.parse(new TextDecoder().decode(m.data));
  } catch (e) {
    summary.payload_failures.push({ seq: m.seq, subject: m.subject, errors: [String(e)] });
    return;
  }
  if (!validate(payload)) {
    const errors = explain(payload).slice(0, 5).map((e) => `${e.instancePath} ${e.message}`);
    summary.payload_failures.push({ seq: m.seq, subject: m.subject, errors });
  }
  if (m.subject.startsWith(`sandboxer.deadletter.`)) {
    summary.deadletters += 1;
    const durable = m.subject.slice("sandboxer.deadletter.".length);
    const original = m.headers?.get("Sandboxer-Subject") ?? "";
    const problem = !durableRule.test(durable)
      ? `durable ${durable} breaks ${subjects.deadletter.token_pattern}`
      : subjectProblem(original, payload);
    if (problem) summary.subject_failures.push({ seq: m.seq, subject: m.subject, problem });
    return;
  }
  const problem = subjectProblem(m.subject, payload);
  if (problem) summary.subject_failures.push({ seq: m.seq, subject: m.subject, problem });
  if (seen.has(payload.event_id)) {
    if (seen.get(payload.event_id) !== m.seq) summary.duplicate_event_ids.push(payload.event_id);
    return; // a redelivery: already counted
  }
  seen.set(payload.event_id, m.seq);
  summary.events += 1;
  summary.types[payload.type] = (summary.types[payload.type] ?? 0) + 1;
  const version = `${payload.type}@${payload.schema_version}`;
  summary.versions[version] = (summary.versions[version] ?? 0) + 1;
}

while (acked.size < until && Date.now() < deadline) {
  const batch = await consumer.fetch({ max_messages: 200, expires: 1000 });
  for await (const m of batch) {
    if (m.seq > until) {
      m.ack(); // appended after the run: not part of this check
      continue;
    }
    summary.deliveries += 1;
    if (m.redelivered) summary.redeliveries += 1;
    check(m);
    if (!refused) {
      refused = true;
      m.nak(); // at least once: this one comes again
      continue;
    }
    m.ack();
    acked.add(m.seq);
  }
}
summary.acked = acked.size;
await nc.flush();
await nc.close();
process.stdout.write(JSON.stringify(summary) + "\n");
process.exit(acked.size >= until ? 0 : 3);
