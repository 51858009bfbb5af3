// pop3d's control page: lives on GET /events, acts through the admin API.
// The token (when the API wants one) stays in this tab's sessionStorage and
// travels only in the Authorization header.
"use strict";

const TOKEN_KEY = "pop3d-admin-token";
const state = {
  snapshot: null,
  previous: new Map(), // server name -> {at, sessions, logins}: rates are differences
  rates: new Map(),
  settable: null, // option name -> JSON schema, from the OpenAPI document's ConfigPatch
  configServer: null,
  stream: null,
};

const $ = (selector) => document.querySelector(selector);

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
  const text = await response.text();
  let data = null;
  if (text) {
    try { data = JSON.parse(text); } catch (_) { data = { detail: text }; }
  }
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
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
  $("#token-section").hidden = false;
  $("#main").hidden = true;
  if (why) {
    $("#token-why").textContent = why;
    $("#token-why").classList.add("refused");
  }
  $("#token-input").focus();
  setLive("the admin token is needed", "down");
  if (state.stream) state.stream.abort();
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
  live.textContent = text;
  live.className = kind;
}

async function follow() {
  const controller = new AbortController();
  state.stream = controller;
  const headers = { Accept: "text/event-stream" };
  const current = token();
  if (current) headers.Authorization = `Bearer ${current}`;
  const response = await fetch("/events", { headers, signal: controller.signal, cache: "no-store" });
  if (response.status === 401) {
    askForToken(current ? "That token was refused. Enter the admin token again." : null);
    return false;
  }
  if (!response.ok || !response.body) throw new Error(`the event stream answered ${response.status}`);
  setLive("live", "up");
  notice(null);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return true;
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

async function start() {
  if (state.stream) state.stream.abort();
  let wait = 500;
  for (;;) {
    try {
      const again = await follow();
      if (!again) return; // the token is needed
      wait = 500;
    } catch (error) {
      if (error.name === "AbortError") return;
      setLive("reconnecting…", "down");
    }
    await new Promise((resolve) => setTimeout(resolve, wait));
    wait = Math.min(wait * 2, 5000);
  }
}

// -- drawing -----------------------------------------------------------------------

function cell(row, content, label) {
  const td = document.createElement("td");
  if (content instanceof Node) td.append(content); else td.textContent = content ?? "";
  if (label) td.dataset.label = label;
  row.append(td);
  return td;
}

function button(text, label, onClick, kind) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  b.setAttribute("aria-label", label);
  if (kind) b.className = kind;
  b.addEventListener("click", onClick);
  return b;
}

function localTime(iso) {
  return new Date(iso).toLocaleString();
}

function duration(seconds) {
  seconds = Math.max(0, Math.round(seconds));
  if (seconds < 60) return `${seconds} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${seconds % 60} s`;
  return `${Math.floor(seconds / 3600)} h ${Math.floor((seconds % 3600) / 60)} min`;
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
  drawServers(snapshot);
  drawConnections(snapshot);
  drawPenalties(snapshot);
  fillServerChoice(snapshot);
}

function drawServers(snapshot) {
  const body = $("#servers tbody");
  body.replaceChildren();
  $("#servers-empty").hidden = snapshot.servers.length > 0;
  for (const server of snapshot.servers) {
    const row = document.createElement("tr");
    row.dataset.server = server.name;
    cell(row, server.name, "Name");
    const stateCell = cell(row, server.state, "State");
    stateCell.className = `state ${server.state}`;
    cell(row, server.addresses.join(" ") || "—", "Addresses");
    cell(row, String(server.connections), "Open");
    const r = rate(server.name, server, snapshot.at);
    cell(row, r ? r.sessions.toFixed(1) : "—", "Sessions/s");
    cell(row, r ? r.logins.toFixed(1) : "—", "Logins/s");
    const actions = document.createElement("span");
    actions.className = "actions";
    const path = `/servers/${encodeURIComponent(server.name)}`;
    const up = button("Up", `Start listening: ${server.name}`, () => act("POST", `${path}/up`));
    const down = button("Down", `Stop listening: ${server.name}`, () => act("POST", `${path}/down`));
    const destroy = button("Destroy…", `Destroy ${server.name}`, () => confirmDestroy(server.name), "danger");
    up.disabled = server.state !== "down";
    down.disabled = server.state !== "up";
    destroy.disabled = server.state === "exiting";
    actions.append(up, down, destroy);
    cell(row, actions, "Actions");
    body.append(row);
  }
}

function drawConnections(snapshot) {
  const body = $("#connections tbody");
  body.replaceChildren();
  let count = 0;
  for (const server of snapshot.servers) {
    for (const session of server.sessions) {
      count += 1;
      const row = document.createElement("tr");
      row.dataset.connection = session.id;
      cell(row, session.id, "Id");
      cell(row, server.name, "Server");
      cell(row, session.user || "—", "User");
      cell(row, session.remote_host.includes(":") ? `[${session.remote_host}]:${session.remote_port}`
        : `${session.remote_host}:${session.remote_port}`, "Remote");
      cell(row, session.tls ? (session.tls_version || "yes") : "no", "TLS");
      cell(row, session.state, "State");
      cell(row, String(session.messages), "Messages");
      cell(row, String(session.octets), "Octets");
      cell(row, session.deleted.length ? session.deleted.join(", ") : "—", "Marked");
      cell(row, localTime(session.started), "Started");
      const idle = cell(row, "", "Idle");
      idle.className = "idle";
      idle.dataset.since = session.last_activity;
      const path = `/servers/${encodeURIComponent(server.name)}/connections/${encodeURIComponent(session.id)}`;
      cell(row, button("Kick…", `Close connection ${session.id}`, () => confirmKick(path, session.id), "danger"),
        "Actions");
      body.append(row);
    }
  }
  const empty = $("#connections-empty");
  empty.hidden = count > 0;
  if (!count) {
    const up = snapshot.servers.find((server) => server.state === "up" && server.addresses.length);
    empty.replaceChildren();
    if (up) {
      empty.append("No connections — try ");
      const code = document.createElement("code");
      code.textContent = `curl pop3://USER:PASSWORD@${up.addresses[0]}/1`;
      empty.append(code, " (the demo's user and password are demo and demo).");
    } else {
      empty.append("No connections, and no server is listening: press Up on a server above.");
    }
  }
  tick();
}

function tick() {
  const now = Date.now();
  for (const idle of document.querySelectorAll("#connections td.idle")) {
    idle.textContent = duration((now - Date.parse(idle.dataset.since)) / 1000);
  }
}
setInterval(tick, 1000);

function drawPenalties(snapshot) {
  const body = $("#penalties tbody");
  body.replaceChildren();
  $("#penalties-empty").hidden = snapshot.penalties.length > 0;
  for (const penalty of snapshot.penalties) {
    const row = document.createElement("tr");
    row.dataset.penalty = penalty.key;
    cell(row, penalty.kind, "Kind");
    cell(row, penalty.key, "Address or user");
    cell(row, String(penalty.failures), "Failures");
    cell(row, `${penalty.delay} s`, "Delay");
    cell(row, localTime(penalty.last_failure), "Last failure");
    const path = penalty.kind === "user" ? `/penalties/users/${encodeURIComponent(penalty.key)}`
      : `/penalties/${encodeURIComponent(penalty.key)}`;
    cell(row, button("Clear", `Clear the penalty of ${penalty.kind} ${penalty.key}`, () => act("DELETE", path)),
      "Actions");
    body.append(row);
  }
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

function confirmDestroy(name) {
  const dialog = $("#destroy-dialog");
  dialog.querySelector(".which").textContent = name;
  dialog.returnValue = "cancel";
  dialog.onclose = () => {
    const mode = dialog.returnValue;
    if (mode === "defer" || mode === "kill") {
      act("DELETE", `/servers/${encodeURIComponent(name)}?mode=${mode}`);
    }
  };
  dialog.showModal();
}

function confirmKick(path, id) {
  const dialog = $("#kick-dialog");
  dialog.querySelector(".which").textContent = id;
  $("#kick-reason").value = "";
  dialog.returnValue = "cancel";
  dialog.onclose = () => {
    if (dialog.returnValue !== "kick") return;
    const reason = $("#kick-reason").value.trim();
    act("DELETE", reason ? `${path}?reason=${encodeURIComponent(reason)}` : path);
  };
  dialog.showModal();
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
      if (kind === "boolean") {
        input.type = "checkbox";
        input.checked = Boolean(value);
      } else if (kind === "integer" || kind === "number") {
        input.type = "number";
        input.step = kind === "integer" ? "1" : "any";
        input.value = value ?? "";
      } else {
        input.type = "text";
        input.value = Array.isArray(value) ? value.join(", ") : (value ?? "");
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
  if (kind === "array") return input.value.split(",").map((item) => item.trim()).filter(Boolean);
  return input.value === "" ? null : input.value;
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
  for (const message of document.querySelectorAll("#config-fields .field-error")) message.textContent = "";
  const result = $("#config-result");
  if (!Object.keys(changes).length) { result.textContent = "Nothing changed."; return; }
  try {
    await api("PATCH", `/servers/${encodeURIComponent(name)}/config`, changes);
    await loadConfig(name);
    result.textContent = `Saved: ${Object.keys(changes).join(", ")}.`;
  } catch (error) {
    if (error.status === 401) return;
    const named = (error.body && error.body.fields) || [];
    for (const field of named) {
      const option = field.field.split(".")[0];
      const message = document.querySelector(`#config-fields [data-option="${CSS.escape(option)}"] .field-error`);
      if (message) message.textContent = field.message;
    }
    result.textContent = named.length ? "Not saved: see the fields marked." : `Not saved: ${error.message}`;
  }
});

start();
