// Creates a server and waits for its actions the way hcloud-go's ActionClient.WaitFor does:
// GET /actions?id=A&id=B&page=1&per_page=50 (following meta.pagination.next_page) until none is running.
// Usage: SIM_ENDPOINT=... SIM_TOKEN=... node poll_actions.mjs SERVER_NAME
// Prints one JSON line: {"server_id", "polls", "actions": [{"id", "command", "status", "progress"}]}.

const endpoint = process.env.SIM_ENDPOINT;
const token = process.env.SIM_TOKEN;
const name = process.argv[2];
if (!endpoint || !token || !name) {
  console.error("usage: SIM_ENDPOINT=... SIM_TOKEN=... node poll_actions.mjs SERVER_NAME");
  process.exit(2);
}
const headers = { Authorization: `Bearer ${token}`, "User-Agent": "hcloud-go/2.0.0", Accept: "application/json" };

async function call(method, path, body) {
  const response = await fetch(endpoint + path, {
    method,
    headers: body ? { ...headers, "Content-Type": "application/json" } : headers,
    body: body ? JSON.stringify(body) : undefined,
  });
  const payload = await response.json();
  if (!response.ok) {
    throw new Error(`${method} ${path}: ${response.status} ${payload.error.code}: ${payload.error.message}`);
  }
  return payload;
}

async function allActions(ids) {
  const actions = [];
  for (let page = 1; page; ) {
    const query = ids.map((id) => `id=${id}`).join("&") + `&page=${page}&per_page=50`;
    const payload = await call("GET", `/actions?${query}`);
    actions.push(...payload.actions);
    page = payload.meta?.pagination?.next_page ?? 0;
  }
  return actions;
}

const created = await call("POST", "/servers", { name, server_type: "cx22", image: "debian-12", location: "nbg1" });
const ids = [created.action.id, ...created.next_actions.map((a) => a.id)];
const deadline = Date.now() + 30000;
let polls = 0;
let actions = [];
for (;;) {
  actions = await allActions(ids);
  polls += 1;
  const running = actions.filter((a) => a.status === "running");
  const failed = actions.filter((a) => a.status === "error");
  if (failed.length) throw new Error(`action(s) failed: ${JSON.stringify(failed)}`);
  if (!running.length) break;
  if (Date.now() > deadline) throw new Error(`actions still running after 30 s: ${JSON.stringify(running)}`);
  await new Promise((resolve) => setTimeout(resolve, 50));
}
const summary = actions.map(({ id, command, status, progress }) => ({ id, command, status, progress }));
console.log(JSON.stringify({ server_id: created.server.id, polls, actions: summary }));
