// Drives a process-mcp HTTP endpoint the way a TypeScript agent would, and prints what it saw as JSON.
//
//   node drive.mjs <sdk1|sdk2> <url> <token>
//
// sdk1 is @modelcontextprotocol/sdk 1.x: the 2025 handshake with an Mcp-Session-Id (Claude Code, the
// Inspector). sdk2 is @modelcontextprotocol/client 2.x pinned to the stateless 2026-07-28 revision.
// The scenario: list the tools, run a command, one turn of a Python REPL in a terminal, kill a
// sleeper, and list the processes.
import { Client as Client1 } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport as Transport1 } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import { Client as Client2, StreamableHTTPClientTransport as Transport2 } from "@modelcontextprotocol/client";

const [flavour, url, token] = process.argv.slice(2);
const requestInit = { headers: { Authorization: `Bearer ${token}` } };
const info = { name: "process-mcp-test", version: "1.0.0" };

let client;
let transport;
if (flavour === "sdk1") {
  client = new Client1(info);
  transport = new Transport1(new URL(url), { requestInit });
} else if (flavour === "sdk2") {
  client = new Client2(info, { versionNegotiation: { mode: { pin: "2026-07-28" } } });
  transport = new Transport2(new URL(url), { requestInit });
} else {
  throw new Error(`unknown flavour ${flavour}; use sdk1 or sdk2`);
}

async function call(name, args) {
  const result = await client.callTool({ name, arguments: args });
  if (result.isError) throw new Error(`${name} failed: ${result.content[0].text}`);
  return result.structuredContent;
}

await client.connect(transport);
const seen = {};
seen.sessionId = transport.sessionId ?? null;
seen.protocolVersion = transport.protocolVersion ?? null;
seen.tools = (await client.listTools()).tools.map((tool) => tool.name).sort();
seen.echo = (await call("spawn", { command: "echo hello from $0" })).stdout;
const repl = await call("spawn", { command: "python3 -q", tty: true, waitFor: ">>> $" });
seen.replTurn = (await call("stdin", { id: repl.pid, input: "6*7\r", waitFor: ">>> $" })).stdout;
await call("kill", { id: repl.pid, signal: "KILL" });
const sleeper = await call("spawn", { command: "sleep 600", background: true });
await call("kill", { id: sleeper.pid });
seen.kill = await call("stdout", { id: sleeper.pid, untilExit: true, waitMs: 10000, lines: 1 });
seen.ps = (await call("ps", {})).processes.map((p) => [p.pid, p.status]);
await client.close();
console.log(JSON.stringify(seen));
