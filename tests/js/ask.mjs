// A TypeScript agent whose client can ask its user (MCP elicitation): it starts a password prompt, has
// process-mcp ask the user through the client, and prints every reply it got as JSON. The "user" answers
// with the secret given on the command line.
//
//   node ask.mjs <sdk1|sdk2> <url> <token> <secret>
import { Client as Client1 } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport as Transport1 } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import { ElicitRequestSchema } from "@modelcontextprotocol/sdk/types.js";
import { Client as Client2, StreamableHTTPClientTransport as Transport2 } from "@modelcontextprotocol/client";

const [flavour, url, token, secret] = process.argv.slice(2);
const requestInit = { headers: { Authorization: `Bearer ${token}` } };
const info = { name: "process-mcp-test", version: "1.0.0" };
const capabilities = { elicitation: { form: {} } };
const questions = [];
const answer = async (request) => {
  questions.push(request.params.message);
  return { action: "accept", content: { answer: secret } };
};

let client;
let transport;
if (flavour === "sdk1") {
  client = new Client1(info, { capabilities });
  client.setRequestHandler(ElicitRequestSchema, answer);
  transport = new Transport1(new URL(url), { requestInit });
} else if (flavour === "sdk2") {
  client = new Client2(info, { capabilities, versionNegotiation: { mode: { pin: "2026-07-28" } } });
  client.setRequestHandler("elicitation/create", answer);
  transport = new Transport2(new URL(url), { requestInit });
} else {
  throw new Error(`unknown flavour ${flavour}; use sdk1 or sdk2`);
}

await client.connect(transport);
const prompt = "import getpass; p = getpass.getpass('Password: '); print('length', len(p)); print('said it')";
const spawned = await client.callTool({
  name: "spawn",
  arguments: { command: `python3 -c "${prompt}"`, tty: true, timeoutMs: 60000 },
});
const pid = spawned.structuredContent.pid;
const typed = await client.callTool({
  name: "stdin",
  arguments: { id: pid, input: "", askUser: "Password for the test vault?", waitFor: "said" },
});
const read = await client.callTool({ name: "stdout", arguments: { id: pid, untilExit: true, waitMs: 10000 } });
await client.close();
console.log(JSON.stringify({ questions, spawned, typed, read }));
