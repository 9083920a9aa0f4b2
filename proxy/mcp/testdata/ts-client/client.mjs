// The TypeScript MCP SDK's client against an MCP server with the tools read_file, search and
// delete_repo, through escrow. It lists the tools and makes allowed and refused calls, prints
// one JSON line per step, and exits 1 unless each outcome is the expected one:
//   tools/list shows read_file and search, not MCP_HIDDEN_TOOL;
//   search and read_file /workspace/... return the server's result;
//   read_file /etc/passwd and MCP_HIDDEN_TOOL fail with escrow's JSON-RPC error (code -32050).
//
// Environment:
//   MCP_ENDPOINT    the server's endpoint, e.g. https://mcp.example.test/mcp (required)
//   HTTPS_PROXY     escrow's listener; when set, requests go through an undici ProxyAgent
//   ESCROW_CA_FILE  PEM file the client trusts for the server's (escrow's) certificates
//   MCP_HIDDEN_TOOL a tool no policy permits (default delete_repo): not listed, its call refused
import { readFileSync } from 'node:fs';
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';
import { fetch as undiciFetch, ProxyAgent, Agent } from 'undici';

const CODE_DENIED = -32050;
const hidden = process.env.MCP_HIDDEN_TOOL || 'delete_repo';
const endpoint = process.env.MCP_ENDPOINT;
if (!endpoint) {
  console.error('client: set MCP_ENDPOINT');
  process.exit(2);
}
const ca = process.env.ESCROW_CA_FILE ? readFileSync(process.env.ESCROW_CA_FILE, 'utf8') : undefined;
const proxy = process.env.HTTPS_PROXY || process.env.https_proxy;
const dispatcher = proxy
  ? new ProxyAgent({ uri: proxy, requestTls: ca ? { ca } : undefined })
  : new Agent({ connect: ca ? { ca } : undefined });
const fetchThrough = (url, init) => undiciFetch(url, { ...init, dispatcher });

let failed = false;
const report = (step) => {
  if (!step.ok) failed = true;
  console.log(JSON.stringify(step));
};

const client = new Client({ name: 'escrow-ts-test-agent', version: '1.0.0' });
const transport = new StreamableHTTPClientTransport(new URL(endpoint), { fetch: fetchThrough });
await client.connect(transport);
report({ step: 'connect', ok: true, session: transport.sessionId ?? '', protocol: transport.protocolVersion ?? '' });

const tools = [];
let cursor;
do {
  const page = await client.listTools(cursor ? { cursor } : {});
  tools.push(...page.tools.map((t) => t.name));
  cursor = page.nextCursor;
} while (cursor);
tools.sort();
report({ step: 'tools/list', tools, ok: tools.includes('read_file') && tools.includes('search') && !tools.includes(hidden) });

const calls = [
  { name: 'search', arguments: { query: 'flaky test' }, allowed: true },
  { name: 'read_file', arguments: { path: '/workspace/a' }, allowed: true },
  { name: 'read_file', arguments: { path: '/etc/passwd' }, allowed: false },
  { name: hidden, arguments: { name: 'prod' }, allowed: false },
];
for (const c of calls) {
  try {
    const res = await client.callTool({ name: c.name, arguments: c.arguments });
    const text = res.content?.[0]?.text ?? '';
    report({ step: 'tools/call', name: c.name, arguments: c.arguments, result: text, ok: c.allowed && !res.isError });
  } catch (err) {
    report({ step: 'tools/call', name: c.name, arguments: c.arguments, code: err.code, message: err.message, ok: !c.allowed && err.code === CODE_DENIED });
  }
}
await client.close();
process.exit(failed ? 1 : 0);
