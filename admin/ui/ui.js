// pop3d's control page: lives on GET /events, acts through the admin API.
// The token (when the API wants one) stays in this tab's sessionStorage and
// travels only in the Authorization header.  Every string from the server is
// put in the page as text (textContent), never as HTML.
"use strict";

const TOKEN_KEY = "pop3d-admin-token";
// A server whose auth option points here serves the demo data (pop3d.serve.demo_data_dir):
// $XDG_DATA_HOME/pop3d/demo, or a private pop3d-demo-* directory.
const DEMO_AUTH = /^passwd-file:.*[\\/]pop3d(?:-demo-[^\\/]+)?[\\/]demo[\\/]users$/;
const state = {
  snapshot: null,
  clock: null, // {at, received}: the server's time at the last snapshot, and when it arrived here
  previous: new Map(), // server name -> {at, sessions, logins}: rates are differences
  rates: new Map(),
  settable: null, // option name -> JSON schema, from the OpenAPI document's ConfigPatch
  configServer: null,
  auth: new Map(), // server name -> its auth option (null while asked for)
  stream: null, // the AbortController of the open event stream
  generation: 0, // bumped to stop the reconnect loop that is running
};

const $ = (selector) => document.querySelector(selector);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.detail) || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

async function errorOf(response) {
  const text = await response.text();
  let data = null;
  if (text) {
    try { data = JSON.parse(text); } catch (_) { data = { detail: text }; }
  }
  return new ApiError(response.status, data);
}

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  const current = token();
  if (current) headers.Authorization = `Bearer ${current}`;
  const init = { method, headers, cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (response.status === 401) {
    askForToken(current ? "That token was refused. Enter the admin token again." : null);
    throw new ApiError(401, { detail: "the admin token is needed" });
  }
  if (!response.ok) throw await errorOf(response);
  const text = await response.text();
  return text ? JSON.parse(text) : null;
}

function notice(message, kind = "error") {
  const box = $("#notice");
  if (!message) { box.hidden = true; box.textContent = ""; return; }
  box.textContent = message;
  box.className = kind;
  box.hidden = false;
}

// -- the token -----------------------------------------------------------------

function askForToken(why) {
  sessionStorage.removeItem(TOKEN_KEY);
  stop();
  $("#token-section").hidden = false;
  $("#main").hidden = true;
  if (why) {
    $("#token-why").textContent = why;
    $("#token-why").classList.add("refused");
  }
  $("#token-input").focus();
  setLive("the admin token is needed", "down");
}

$("#token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const value = $("#token-input").value.trim();
  if (!value) return;
  sessionStorage.setItem(TOKEN_KEY, value);
  $("#token-input").value = "";
  $("#token-section").hidden = true;
  $("#main").hidden = false;
  start();
});

// -- the live stream -------------------------------------------------------------

function setLive(text, kind) {
  const live = $("#live");
  if (live.textContent !== text) live.textContent = text;
  live.className = kind;
}

// Reads /events until it ends ("ended") or the token is refused ("token").
async function follow(generation) {
  const controller = new AbortController();
  state.stream = controller;
  const headers = { Accept: "text/event-stream" };
  const current = token();
  if (current) headers.Authorization = `Bearer ${current}`;
  const response = await fetch("/events", { headers, signal: controller.signal, cache: "no-store" });
  if (generation !== state.generation) { controller.abort(); return "stopped"; }
  if (response.status === 401) {
    askForToken(current ? "That token was refused. Enter the admin token again." : null);
    return "token";
  }
  if (!response.ok || !response.body) throw await errorOf(response);
  setLive("live", "up");
  notice(null);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (generation !== state.generation) { controller.abort(); return "stopped"; }
    if (done) return "ended";
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trimStart()).join("\n");
      if (data) show(JSON.parse(data));
    }
  }
}

// Stops the running loop, even one asleep between two attempts.
function stop() {
  state.generation += 1;
  if (state.stream) state.stream.abort();
  state.stream = null;
}

// Follows the stream, reconnecting with back-off; a later start() or stop() ends this loop.
async function start() {
  stop();
  const generation = state.generation;
  let wait = 500;
  while (generation === state.generation) {
    try {
      const outcome = await follow(generation);
      if (outcome !== "ended") return;
      setLive("the stream ended: reconnecting…", "down");
      wait = 500;
    } catch (error) {
      if (generation !== state.generation) return;
      setLive("reconnecting…", "down");
      if (error instanceof ApiError) notice(`The event stream was refused: ${error.message}`);
    }
    await sleep(wait);
    wait = Math.min(wait * 2, 5000);
  }
}

// -- drawing -----------------------------------------------------------------------

function setText(element, text) {
  if (element.textContent !== text) element.textContent = text;
}

function makeRow(labels) {
  const row = document.createElement("tr");
  row.setAttribute("role", "row"); // kept at phone width, where the rows are display: block
  for (const label of labels) {
    const td = document.createElement("td");
    td.setAttribute("role", "cell");
    td.dataset.label = label;
    row.append(td);
  }
  return row;
}

// Writes each text into the row's cells, in order (null leaves a cell alone).
function fill(row, texts) {
  texts.forEach((text, index) => { if (text !== null) setText(row.cells[index], text); });
}

// visible: the button's text; name: what it acts on, appended to the text for its accessible name.
function button(visible, name, onClick, kind) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = visible;
  b.dataset.action = visible;
  b.setAttribute("aria-label", `${visible.replace(/…$/, "")} ${name}`);
  if (kind) b.className = kind;
  b.addEventListener("click", (event) => {
    if (b.getAttribute("aria-disabled") !== "true") onClick(event);
  });
  return b;
}

// aria-disabled rather than disabled: a focused button that becomes unusable keeps the focus.
function setDisabled(b, disabled) {
  if (disabled) b.setAttribute("aria-disabled", "true"); else b.removeAttribute("aria-disabled");
}

// Keeps body's rows in step with items, keyed by keyOf: rows that stay are updated in
// place (make builds a new one, update writes its cells), so a focused button is never
// replaced; rows that vanished are removed, and their focus goes to a neighbour's button.
function syncRows(body, items, keyOf, make, update) {
  const focused = document.activeElement;
  const rows = new Map([...body.rows].map((row) => [row.dataset.key, row]));
  const wanted = new Set(items.map(keyOf));
  let lost = null; // {index, action} of a focused button whose row vanished
  [...body.rows].forEach((row, index) => {
    if (wanted.has(row.dataset.key)) return;
    if (row.contains(focused)) lost = { index, action: focused.dataset.action };
    row.remove();
    rows.delete(row.dataset.key);
  });
  let next = body.firstElementChild;
  for (const item of items) {
    const key = keyOf(item);
    let row = rows.get(key);
    if (!row) {
      row = make(item);
      row.dataset.key = key;
    }
    update(row, item);
    if (row === next) next = next.nextElementSibling;
    else body.insertBefore(row, next);
  }
  if (focused && focused.isConnected && document.activeElement !== focused) {
    focused.focus({ preventScroll: true }); // its row moved
  } else if (lost) {
    const near = body.rows[Math.min(lost.index, body.rows.length - 1)];
    const target = near && near.querySelector(`button[data-action="${CSS.escape(lost.action || "")}"]`);
    const heading = body.closest("section").querySelector("h2");
    (target || heading).focus({ preventScroll: true });
  }
}

function pad(number) {
  return String(number).padStart(2, "0");
}

// In the browser's time zone, as 2025-01-31 14:05:09 (the same in every locale).
function localTime(iso) {
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return "—";
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} `
    + `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

function duration(seconds) {
  seconds = Math.max(0, Math.round(seconds));
  if (seconds < 60) return `${seconds} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${seconds % 60} s`;
  return `${Math.floor(seconds / 3600)} h ${Math.floor((seconds % 3600) / 60)} min`;
}

// The server's clock now: the last snapshot's time plus what has passed here since it came.
function serverNow() {
  if (!state.clock) return null;
  return state.clock.at + (performance.now() - state.clock.received);
}

function rate(name, server, at) {
  const now = { at: Date.parse(at), sessions: server.sessions_total, logins: server.logins_ok + server.logins_failed };
  const before = state.previous.get(name);
  if (before && now.at - before.at >= 900) {
    const seconds = (now.at - before.at) / 1000;
    state.rates.set(name, {
      sessions: (now.sessions - before.sessions) / seconds,
      logins: (now.logins - before.logins) / seconds,
    });
    state.previous.set(name, now);
  } else if (!before) {
    state.previous.set(name, now);
  }
  return state.rates.get(name);
}

function show(snapshot) {
  state.snapshot = snapshot;
  state.clock = { at: Date.parse(snapshot.at), received: performance.now() };
  drawServers(snapshot);
  drawConnections(snapshot);
  drawPenalties(snapshot);
  fillServerChoice(snapshot);
  $("#main").dataset.at = snapshot.at; // when the page last heard from the server
}

const SERVER_LABELS = ["Name", "State", "Addresses", "Open", "Sessions/s", "Logins/s", "Actions"];

function makeServerRow(server) {
  const row = makeRow(SERVER_LABELS);
  row.dataset.server = server.name;
  const name = server.name;
  const path = `/servers/${encodeURIComponent(name)}`;
  const actions = document.createElement("span");
  actions.className = "actions";
  actions.append(
    button("Up", name, () => act("POST", `${path}/up`)),
    button("Down", name, () => act("POST", `${path}/down`)),
    button("Destroy…", name, (event) => confirmDestroy(name, event.currentTarget), "danger"),
  );
  row.cells[6].append(actions);
  return row;
}

function updateServerRow(row, server, at) {
  const r = rate(server.name, server, at);
  fill(row, [
    server.name, server.state, server.addresses.join(" ") || "—", String(server.sessions_count),
    r ? r.sessions.toFixed(1) : "—", r ? r.logins.toFixed(1) : "—",
  ]);
  row.cells[1].className = `state ${server.state}`;
  const [up, down, destroy] = row.cells[6].querySelectorAll("button");
  setDisabled(up, server.state !== "down");
  setDisabled(down, server.state !== "up");
  setDisabled(destroy, server.state === "exiting");
}

function drawServers(snapshot) {
  $("#servers-empty").hidden = snapshot.servers.length > 0;
  syncRows($("#servers tbody"), snapshot.servers, (server) => server.name, makeServerRow,
    (row, server) => updateServerRow(row, server, snapshot.at));
}

const CONNECTION_LABELS = ["Id", "Server", "User", "Remote", "TLS", "State", "Messages", "Octets", "Marked",
  "Started", "Idle", "Actions"];

function makeConnectionRow({ server, session }) {
  const row = makeRow(CONNECTION_LABELS);
  row.dataset.connection = session.id;
  row.dataset.server = server;
  row.cells[10].className = "idle";
  const path = `/servers/${encodeURIComponent(server)}/connections/${encodeURIComponent(session.id)}`;
  row.cells[11].append(button("Kick…", session.id,
    (event) => confirmKick(path, session.id, event.currentTarget), "danger"));
  return row;
}

function updateConnectionRow(row, { server, session }) {
  const host = session.remote_host.includes(":") ? `[${session.remote_host}]` : session.remote_host;
  fill(row, [
    session.id, server, session.user || "—", `${host}:${session.remote_port}`,
    session.tls ? (session.tls_version || "yes") : "no", session.state, String(session.messages),
    String(session.octets), String(session.marked), localTime(session.started),
  ]);
  row.cells[10].dataset.since = session.last_activity;
}

function drawConnections(snapshot) {
  const items = snapshot.servers.flatMap((server) =>
    server.sessions.map((session) => ({ server: server.name, session })));
  syncRows($("#connections tbody"), items, ({ server, session }) => `${server}\n${session.id}`,
    makeConnectionRow, updateConnectionRow);
  const truncated = snapshot.servers.filter((server) => server.sessions_truncated)
    .map((server) => `${server.name}: showing ${server.sessions.length} of ${server.sessions_count}`);
  const note = $("#connections-truncated");
  note.hidden = !truncated.length;
  setText(note, truncated.length ? `${truncated.join("; ")} open connections (the newest).` : "");
  drawConnectionsEmpty(snapshot, items.length);
  tick();
}

function drawConnectionsEmpty(snapshot, count) {
  const empty = $("#connections-empty");
  empty.hidden = count > 0;
  if (count) return;
  const up = snapshot.servers.find((server) => server.state === "up" && server.addresses.length);
  const parts = [];
  if (up) {
    const code = document.createElement("code");
    code.textContent = `curl pop3://USER:PASSWORD@${up.addresses[0]}/1`;
    parts.push("No connections — try ", code);
    const auth = authOf(up.name);
    parts.push(auth && DEMO_AUTH.test(auth) ? " (the demo's user and password are demo and demo)." : ".");
  } else if (snapshot.servers.length) {
    parts.push("No connections, and no server is listening: press Up on a server above.");
  } else {
    parts.push("No connections: there is no server (see above).");
  }
  // Redrawn only when it says something else, so that a screen reader is not told it again.
  const text = parts.map((part) => (typeof part === "string" ? part : part.textContent)).join("");
  if (empty.dataset.text !== text) {
    empty.replaceChildren(...parts);
    empty.dataset.text = text;
  }
}

// The server's auth option, asked for once; the empty state is drawn again when it comes.
function authOf(name) {
  if (state.auth.has(name)) return state.auth.get(name);
  state.auth.set(name, null);
  api("GET", `/servers/${encodeURIComponent(name)}/config`).then((config) => {
    state.auth.set(name, config.auth || "");
    if (state.snapshot) drawConnectionsEmpty(state.snapshot, $("#connections tbody").rows.length);
  }, () => state.auth.delete(name));
  return null;
}

function tick() {
  const now = serverNow();
  if (now === null) return;
  for (const idle of document.querySelectorAll("#connections td.idle")) {
    setText(idle, duration((now - Date.parse(idle.dataset.since)) / 1000));
  }
}
setInterval(tick, 1000);

const PENALTY_LABELS = ["Kind", "Address or user", "Failures", "Delay", "Last failure", "Actions"];

function makePenaltyRow(penalty) {
  const row = makeRow(PENALTY_LABELS);
  row.dataset.penalty = penalty.key;
  row.dataset.kind = penalty.kind;
  const path = penalty.kind === "user" ? `/penalties/users/${encodeURIComponent(penalty.key)}`
    : `/penalties/${encodeURIComponent(penalty.key)}`;
  row.cells[5].append(button("Clear", penalty.key, () => act("DELETE", path)));
  return row;
}

function updatePenaltyRow(row, penalty) {
  fill(row, [penalty.kind, penalty.key, String(penalty.failures), `${Number(penalty.delay).toFixed(1)} s`,
    localTime(penalty.last_failure)]);
}

function drawPenalties(snapshot) {
  $("#penalties-empty").hidden = snapshot.penalties.length > 0;
  syncRows($("#penalties tbody"), snapshot.penalties, (penalty) => `${penalty.kind}\n${penalty.key}`,
    makePenaltyRow, updatePenaltyRow);
}

// -- acting --------------------------------------------------------------------------

async function act(method, path, body) {
  try {
    await api(method, path, body);
    notice(null);
    return true;
  } catch (error) {
    if (error.status !== 401) notice(error.message);
    return false;
  }
}

// Opens a confirmation; on close, focus goes back to the button that opened it.
function confirm(dialog, opener, onClose) {
  dialog.returnValue = "cancel";
  dialog.onclose = () => {
    if (opener && opener.isConnected) opener.focus();
    onClose(dialog.returnValue);
  };
  dialog.showModal();
}

function confirmDestroy(name, opener) {
  const dialog = $("#destroy-dialog");
  dialog.querySelector(".which").textContent = name;
  confirm(dialog, opener, (mode) => {
    if (mode === "defer" || mode === "kill") act("DELETE", `/servers/${encodeURIComponent(name)}?mode=${mode}`);
  });
}

function confirmKick(path, id, opener) {
  const dialog = $("#kick-dialog");
  dialog.querySelector(".which").textContent = id;
  $("#kick-reason").value = "";
  confirm(dialog, opener, (choice) => {
    if (choice !== "kick") return;
    const reason = $("#kick-reason").value.trim();
    act("DELETE", reason ? `${path}?reason=${encodeURIComponent(reason)}` : path);
  });
}

// -- configuration -------------------------------------------------------------------

function fillServerChoice(snapshot) {
  const select = $("#config-server");
  const names = snapshot.servers.map((server) => server.name);
  const shown = [...select.options].map((option) => option.value);
  if (names.join("\n") !== shown.join("\n")) {
    select.replaceChildren(...names.map((name) => new Option(name, name)));
    if (names.includes(state.configServer)) select.value = state.configServer;
  }
  if (names.length && select.value !== state.configServer) loadConfig(select.value);
  if (!names.length) { state.configServer = null; $("#config-fields").replaceChildren(); }
}

$("#config-server").addEventListener("change", (event) => loadConfig(event.target.value));

async function settable() {
  if (state.settable) return state.settable;
  // The options PATCH accepts, as the API documents them: nothing to keep in step here.
  const response = await fetch("/openapi.json", { cache: "no-store" });
  if (!response.ok) throw await errorOf(response);
  const spec = await response.json();
  let schema = spec.paths["/servers/{name}/config"].patch.requestBody.content["application/json"].schema;
  if (schema.$ref) schema = spec.components.schemas[schema.$ref.split("/").pop()];
  state.settable = schema.properties;
  return state.settable;
}

function kindOf(schema) {
  const types = schema.type ? [schema.type] : (schema.anyOf || []).map((option) => option.type);
  return types.find((type) => type && type !== "null") || "string";
}

// Whether the schema takes null (the option's default), or the string "none" (an empty list).
function takesNull(schema) {
  return schema.type === "null" || (schema.anyOf || []).some((option) => option.type === "null");
}

function takesNone(schema) {
  return (schema.anyOf || []).some((option) => option.const === "none");
}

function messageOf(option) {
  return document.querySelector(`#config-fields [data-option="${CSS.escape(option)}"] .field-error`);
}

function setFieldError(option, text) {
  const message = messageOf(option);
  if (!message) return false;
  message.textContent = text;
  const input = message.parentElement.querySelector("input");
  if (input) {
    if (text) input.setAttribute("aria-invalid", "true"); else input.removeAttribute("aria-invalid");
  }
  return true;
}

async function loadConfig(name) {
  state.configServer = name;
  $("#config-result").textContent = "";
  let config;
  let fields;
  try {
    [config, fields] = await Promise.all([api("GET", `/servers/${encodeURIComponent(name)}/config`), settable()]);
  } catch (error) {
    if (error.status !== 401) notice(error.message);
    return;
  }
  state.auth.set(name, config.auth || "");
  const box = $("#config-fields");
  box.replaceChildren();
  for (const [option, value] of Object.entries(config)) {
    const schema = fields[option];
    const id = `option-${option}`;
    const row = document.createElement("div");
    row.className = "field";
    row.dataset.option = option;
    const label = document.createElement("label");
    label.htmlFor = id;
    label.textContent = option;
    let input;
    if (!schema) {
      input = document.createElement("output");
      input.textContent = Array.isArray(value) ? value.join(", ") : String(value ?? "—");
      label.removeAttribute("for");
    } else {
      const kind = kindOf(schema);
      input = document.createElement("input");
      input.name = option;
      input.dataset.kind = kind;
      input.dataset.nullable = String(takesNull(schema));
      input.dataset.none = String(takesNone(schema));
      if (kind === "boolean") {
        input.type = "checkbox";
        input.checked = Boolean(value);
      } else if (kind === "integer" || kind === "number") {
        input.type = "number";
        input.step = kind === "integer" ? "1" : "any";
        input.value = value ?? "";
      } else {
        input.type = "text";
        if (Array.isArray(value)) input.value = value.length || !takesNone(schema) ? value.join(", ") : "none";
        else input.value = value ?? "";
      }
      input.dataset.original = input.type === "checkbox" ? String(input.checked) : input.value;
      if (schema.description) input.title = schema.description;
    }
    input.id = id;
    const message = document.createElement("span");
    message.className = "field-error";
    message.id = `${id}-error`;
    message.setAttribute("aria-live", "polite");
    if (input.tagName === "INPUT") input.setAttribute("aria-describedby", message.id);
    row.append(label, input, message);
    box.append(row);
  }
}

function valueOf(input) {
  const kind = input.dataset.kind;
  if (kind === "boolean") return input.checked;
  if (kind === "integer" || kind === "number") return input.value === "" ? null : Number(input.value);
  const text = input.value.trim();
  if (kind === "array") {
    // The API takes the string "none" for an empty list (never ["none"]).
    if ((text === "" || text.toLowerCase() === "none") && input.dataset.none === "true") return "none";
    return text.split(",").map((item) => item.trim()).filter(Boolean);
  }
  return text === "" && input.dataset.nullable === "true" ? null : input.value;
}

$("#config-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const name = state.configServer;
  if (!name) return;
  const changes = {};
  for (const input of document.querySelectorAll("#config-fields input")) {
    const now = input.type === "checkbox" ? String(input.checked) : input.value;
    if (now !== input.dataset.original) changes[input.name] = valueOf(input);
  }
  for (const field of document.querySelectorAll("#config-fields .field")) setFieldError(field.dataset.option, "");
  const result = $("#config-result");
  if (!Object.keys(changes).length) { result.textContent = "Nothing changed."; return; }
  try {
    await api("PATCH", `/servers/${encodeURIComponent(name)}/config`, changes);
    await loadConfig(name);
    result.textContent = `Saved: ${Object.keys(changes).join(", ")}.`;
  } catch (error) {
    if (error.status === 401) return;
    const named = (error.body && error.body.fields) || [];
    const elsewhere = named.filter((field) => !setFieldError(field.field.split(".")[0], field.message));
    if (named.length > elsewhere.length) {
      const more = elsewhere.map((field) => `${field.field}: ${field.message}`).join("; ");
      result.textContent = `Not saved: see the fields marked.${more ? ` Also: ${more}.` : ""}`;
    } else {
      result.textContent = `Not saved: ${error.message}`;
    }
  }
});

$("#zone").textContent = `Times in ${Intl.DateTimeFormat().resolvedOptions().timeZone || "local time"}`;
start();
