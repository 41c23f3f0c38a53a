// node_echo.js: the same echo service as examples/server1.lua, written as a plain Node.js
// JSON-RPC server (the platform of the original walkthrough), for a side-by-side baseline.
const http = require("http");
const port = Number(process.argv[2] || 3000);
http.createServer((req, res) => {
  if (req.method !== "POST") { res.writeHead(405); res.end(); return; }
  const chunks = [];
  req.on("data", (c) => chunks.push(c));
  req.on("end", () => {
    let out;
    try {
      const call = JSON.parse(Buffer.concat(chunks).toString("utf8"));
      out = { jsonrpc: "2.0", id: call.id, result: { "request-was": call.params[0] } };
    } catch (e) {
      out = { jsonrpc: "2.0", id: null, error: { code: -32700, message: "Parse error" } };
    }
    const body = JSON.stringify(out) + "\n";
    res.writeHead(200, { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(body) });
    res.end(body);
  });
}).listen(port, "127.0.0.1");
