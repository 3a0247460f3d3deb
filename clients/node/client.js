// An example client of mlx-serving's GenerateService: streaming, usage, rich errors,
// cancellation and deadlines.
//
//   node client.js --addr localhost:50051 --model tiny-llama
'use strict';

const path = require('node:path');
const { parseArgs } = require('node:util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

// The repository's proto/ directory, and the vendored buf/validate/validate.proto it imports.
const PROTO_DIR = process.env.MLX_SERVING_PROTO_DIR || path.resolve(__dirname, '../../proto');

const { values: options } = parseArgs({
  options: {
    addr: { type: 'string', default: process.env.MLX_SERVING_ADDR || 'localhost:50051' },
    model: { type: 'string', default: process.env.MLX_SERVING_MODEL || 'tiny-llama' },
  },
});

const definition = protoLoader.loadSync('mlx_serving/v1/generate_service.proto', {
  includeDirs: [PROTO_DIR, path.join(PROTO_DIR, 'vendor/protovalidate')],
  keepCase: true, // fields as the .proto spells them: model_id, max_tokens
  enums: String, // FINISH_REASON_MAX_TOKENS rather than 1
  longs: String,
  defaults: true,
  oneofs: true,
});
const { GenerateService } = grpc.loadPackageDefinition(definition).mlx_serving.v1;

// The google.rpc messages of the rich error model, which the server packs into the
// grpc-status-details-bin trailer.
const rpc = protobuf.parse(`
  syntax = "proto3";
  package google.rpc;
  message Any { string type_url = 1; bytes value = 2; }  // google.protobuf.Any on the wire
  message Status { int32 code = 1; string message = 2; repeated Any details = 3; }
  message BadRequest {
    message FieldViolation { string field = 1; string description = 2; string reason = 3; }
    repeated FieldViolation field_violations = 1;
  }
  message ErrorInfo { string reason = 1; string domain = 2; map<string, string> metadata = 3; }
`, { keepCase: true }).root;
const Status = rpc.lookupType('google.rpc.Status');
const BadRequest = rpc.lookupType('google.rpc.BadRequest');
const ErrorInfo = rpc.lookupType('google.rpc.ErrorInfo');

/** Runs one Generate; `onMessage(message, call)` sees each message. Resolves to the final error, if any. */
function generate(client, request, onMessage, callOptions = {}) {
  return new Promise((resolve) => {
    const call = client.Generate(request, callOptions);
    call.on('data', (message) => onMessage(message, call));
    call.on('error', resolve);
    call.on('end', () => resolve(null));
  });
}

/** Prints a status and the google.rpc details its trailer carries, if any. */
function printStatus(error) {
  console.log(`status: ${grpc.status[error.code]}: ${error.details}`); // the code's name
  const [trailer] = error.metadata ? error.metadata.get('grpc-status-details-bin') : [];
  if (!trailer) return;
  for (const { type_url, value } of Status.decode(trailer).details) {
    switch (type_url.slice(type_url.lastIndexOf('/') + 1)) {
      case 'google.rpc.BadRequest':
        for (const v of BadRequest.decode(value).field_violations) {
          console.log(`field violation: ${v.field}: ${v.description}`);
        }
        break;
      case 'google.rpc.ErrorInfo': {
        const info = ErrorInfo.decode(value);
        console.log(`error info: reason=${info.reason} domain=${info.domain} ` +
          `metadata=${JSON.stringify(info.metadata)}`);
        break;
      }
      default: // a detail this client does not read
    }
  }
}

async function main() {
  const client = new GenerateService(options.addr, grpc.credentials.createInsecure());
  const model_id = options.model;

  // 1, 2: stream the text as it comes; the last message carries the usage.
  console.log('== stream ==');
  const streamError = await generate(
    client,
    { model_id, text: 'Once upon a time', max_tokens: 32, temperature: 0.7, seed: 42 },
    (message) => {
      process.stdout.write(message.text);
      if (message.finish_reason !== 'FINISH_REASON_UNSPECIFIED') {
        const { prompt_tokens, completion_tokens } = message.usage;
        console.log(`\nusage: prompt_tokens=${prompt_tokens} completion_tokens=${completion_tokens} ` +
          `finish_reason=${message.finish_reason}`);
      }
    },
  );
  if (streamError) throw streamError;

  // 3: an invalid request (max_tokens must be at least 1) fails with field violations.
  console.log('== invalid request ==');
  printStatus(await generate(client, { model_id, text: 'Hello', max_tokens: 0 }, () => {}));

  // 4: cancel a long generation after a few messages.
  console.log('== cancel ==');
  let received = 0;
  printStatus(await generate(
    client,
    { model_id, text: 'Tell me a long story', max_tokens: 1024, ignore_eos: true },
    (message, call) => {
      if (++received === 3) {
        console.log(`received ${received} messages, cancelling`);
        call.cancel();
      }
    },
  ));

  // 5: give a generation too long for it 200 ms.
  console.log('== deadline ==');
  const deadlineError = await generate(
    client,
    { model_id, text: 'Tell me a long story', max_tokens: 2000, ignore_eos: true },
    () => {},
    { deadline: Date.now() + 200 },
  );
  if (deadlineError) printStatus(deadlineError);
  else console.log('finished before the deadline');

  client.close();
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
