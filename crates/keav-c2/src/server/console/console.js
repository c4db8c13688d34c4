// keav C2 web console. Static: every piece of data comes from the operator routes of the
// server that served this file, called with the operator token typed in by the operator.
// Text from the server (device names, groups, event texts) is written with textContent only.
"use strict";

// Every operator route the console calls: [method, path template]. A test of keav-c2 reads
// this table and calls each route on a real server, so a renamed route fails the build.
const ROUTES = {
  stats: ["GET", "/v1/c2/stats"],
  devices: ["GET", "/v1/devices"],
  joins: ["GET", "/v1/c2/joins"],
  decide: ["POST", "/v1/c2/joins/{id}"],
  deviceVerb: ["POST", "/v1/c2/devices/{id}/{verb}"],
  confidentialInfo: ["GET", "/v1/c2/devices/{id}/confidential"],
  command: ["POST", "/v1/c2/command"],
  responses: ["POST", "/v1/c2/responses"],
  events: ["GET", "/v1/c2/events?after={after}&limit={limit}"],
  enroll: ["POST", "/v1/enrollments"],
};

// Verbs of ROUTES.deviceVerb the console uses, with what the operator is asked first.
const VERBS = {
  join: null,
  reset: "Reset the replay continuity of {id}? Only for a device that lost its state.",
  terminate: "Terminate {id}? It leaves the fleet.",
  deregister: "Deregister {id}? It is told to leave, then revoked.",
  revoke: "Revoke {id}? This is final: the broker cuts it off and it can never come back.",
};

const TOKEN_KEY = "keav-c2-operator-token";
const REFRESH_MS = 5000;
const EVENTS_MS = 2000;
const MAX_EVENTS_SHOWN = 500;
const MAX_SENT_SHOWN = 200;

const state = {
  token: null,
  devices: [],
  sent: [], // {time, device, what, token, outcome, responses}
  eventsAfter: 0,
  eventsRun: null,
  detail: null,
  timers: [],
};

const $ = (id) => document.getElementById(id);

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function fill(path, params) {
  return path.replace(/\{(\w+)\}/g, (_, k) => encodeURIComponent(String(params[k])));
}

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function call(route, params = {}, body) {
  const [method, template] = ROUTES[route];
  const init = { method, headers: { Authorization: "Bearer " + state.token } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let r;
  try {
    r = await fetch(fill(template, params), init);
  } catch (e) {
    throw new ApiError(0, "unreachable", "the server cannot be reached");
  }
  let json = null;
  try {
    json = await r.json();
  } catch (e) {
    json = null;
  }
  if (r.status === 401) {
    signOut("The server refused the operator token.");
    throw new ApiError(401, "unauthorized", "not signed in");
  }
  if (!r.ok) {
    const msg = json && json.error ? json.error : "HTTP " + r.status;
    throw new ApiError(r.status, json && json.code, msg);
  }
  return json;
}

function showError(id, e) {
  $(id).textContent = e ? (e.message || String(e)) : "";
}

function time(secs) {
  return new Date(secs * 1000).toLocaleString();
}

// --- hex and base64 ---

function hexToBytes(hex) {
  const h = hex.replace(/\s+/g, "");
  if (h.length % 2 !== 0 || /[^0-9a-fA-F]/.test(h)) throw new Error("not hex: " + hex);
  const out = new Uint8Array(h.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(h.substr(i * 2, 2), 16);
  return out;
}

function bytesToBase64(bytes) {
  let s = "";
  for (const b of bytes) s += String.fromCharCode(b);
  return btoa(s);
}

// --- sign in / out ---

async function signIn(token) {
  state.token = token;
  try {
    await call("stats");
  } catch (e) {
    state.token = null;
    if (e.status !== 401) showError("sign-in-error", e);
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  $("sign-in-panel").hidden = true;
  $("app").hidden = false;
  $("sign-out").hidden = false;
  $("server-line").textContent = location.host;
  showError("sign-in-error", null);
  refresh();
  pollEvents();
  state.timers.push(setInterval(refresh, REFRESH_MS));
  state.timers.push(setInterval(pollEvents, EVENTS_MS));
}

function signOut(why) {
  state.token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  for (const t of state.timers) clearInterval(t);
  state.timers = [];
  $("app").hidden = true;
  $("sign-out").hidden = true;
  $("sign-in-panel").hidden = false;
  $("token").value = "";
  $("sign-in-error").textContent = why || "";
}

// --- periodic refresh ---

async function refresh() {
  if (!state.token) return;
  try {
    const [stats, devices, joins] = await Promise.all([
      call("stats"),
      call("devices"),
      call("joins"),
    ]);
    renderStats(stats);
    state.devices = devices.devices;
    renderDevices();
    renderJoins(joins.joins);
    await refreshSent();
    if (state.detail) await showDetail(state.detail);
    showError("app-error", null);
    $("refresh-state").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) {
    if (e.status !== 401) showError("app-error", e);
  }
}

function renderStats(s) {
  const dl = $("stats");
  dl.replaceChildren();
  const add = (k, v) => {
    dl.append(el("dt", k), el("dd", v));
  };
  add("Messages accepted", s.accepted);
  const dropped = s.dropped.reduce((n, [, c]) => n + c, 0);
  add("Messages dropped", dropped + (dropped ? " (" + s.dropped.map(([r, c]) => r + " " + c).join(", ") + ")" : ""));
  add("Oversized payloads", s.oversized);
  if (s.confidential && s.confidential.length) {
    add("Confidential layer", s.confidential.map(([r, c]) => r + " " + c).join(", "));
  }
}

function renderDevices() {
  const body = $("devices");
  body.replaceChildren();
  const f = $("device-filter").value.trim().toLowerCase();
  const shown = state.devices.filter((d) => {
    if (!f) return true;
    const hay = [d.device_id, d.name || "", d.status, d.groups.join(" ")].join(" ").toLowerCase();
    return hay.includes(f);
  });
  $("devices-empty").hidden = state.devices.length !== 0;
  for (const d of shown) {
    const tr = el("tr");
    const id = el("td", d.device_id, "mono");
    tr.append(
      id,
      el("td", d.name || ""),
      el("td", d.groups.join(", ")),
      el("td", d.status.replace("_", " "), "status status-" + d.status),
      el("td", d.alg),
      el("td", time(d.created)),
    );
    const actions = el("td", null, "actions");
    if (d.status !== "revoked") {
      if (d.status === "registered") actions.append(verbButton(d, "join", "Join command"));
      actions.append(detailButton(d));
      actions.append(verbButton(d, "reset", "Reset"));
      if (d.status === "joined") actions.append(verbButton(d, "terminate", "Terminate"));
      actions.append(verbButton(d, "deregister", "Deregister"));
      actions.append(verbButton(d, "revoke", "Revoke", "danger"));
    }
    tr.append(actions);
    body.append(tr);
  }
}

function verbButton(d, verb, label, cls) {
  const b = el("button", label, cls);
  b.type = "button";
  b.addEventListener("click", async () => {
    const ask = VERBS[verb];
    const who = d.device_id + (d.name ? " (" + d.name + ")" : "");
    if (ask && !confirm(ask.replace("{id}", who))) return;
    b.disabled = true;
    try {
      const sent = await call("deviceVerb", { id: d.device_id, verb }, undefined);
      track(sent, verb);
      showError("app-error", null);
    } catch (e) {
      showError("app-error", e);
    }
    b.disabled = false;
    refresh();
  });
  return b;
}

function detailButton(d) {
  const b = el("button", "Confidentiality");
  b.type = "button";
  b.addEventListener("click", () => showDetail(d.device_id));
  return b;
}

async function showDetail(id) {
  state.detail = id;
  try {
    const c = await call("confidentialInfo", { id });
    $("detail-id").textContent = id;
    const dl = $("detail");
    dl.replaceChildren();
    const add = (k, v) => dl.append(el("dt", k), el("dd", v));
    add("Required", c.required ? "yes" : "no");
    add("Session", c.established ? c.session : c.handshaking ? "handshake in progress" : "none");
    add("Sessions completed", c.sessions);
    add("Records sealed / opened", c.records_sealed + " / " + c.records_opened);
    $("detail-require").textContent = c.required ? "Stop requiring confidentiality" : "Require confidentiality";
    $("detail-require").dataset.required = c.required ? "1" : "";
    $("device-detail").hidden = false;
  } catch (e) {
    showError("app-error", e);
  }
}

function renderJoins(joins) {
  const body = $("joins");
  body.replaceChildren();
  $("joins-empty").hidden = joins.length !== 0;
  for (const j of joins) {
    const tr = el("tr");
    const dev = state.devices.find((d) => d.device_id === j.device);
    tr.append(el("td", j.device + (dev && dev.name ? " (" + dev.name + ")" : ""), "mono"));
    tr.append(el("td", j.method));
    const wordsCell = el("td");
    let input = null;
    if (j.method === "human") {
      input = el("input");
      input.placeholder = "the words on the device";
      input.autocomplete = "off";
      wordsCell.append(input);
    } else if (j.method === "observed") {
      wordsCell.textContent = "waits for its observer";
    }
    tr.append(wordsCell);
    const td = el("td", null, "actions");
    if (j.method !== "observed" && j.method !== "command") {
      td.append(decideButton(j, true, input), decideButton(j, false, null));
    } else {
      td.append(decideButton(j, false, null));
    }
    tr.append(td);
    body.append(tr);
  }
}

function decideButton(j, accept, input) {
  const b = el("button", accept ? "Accept" : "Refuse", accept ? "" : "danger");
  b.type = "button";
  b.addEventListener("click", async () => {
    const words = input ? input.value.trim().split(/[\s,]+/).filter((w) => w) : [];
    if (accept && input && words.length === 0) {
      showError("app-error", new Error("Type the words the device shows first."));
      return;
    }
    b.disabled = true;
    try {
      const d = await call("decide", { id: j.device }, { accept, words });
      showError("app-error", d.joined || !accept ? null : new Error("Not joined: " + (d.reason || "refused")));
    } catch (e) {
      showError("app-error", e);
    }
    refresh();
  });
  return b;
}

// --- commands and their responses ---

function track(sent, what) {
  const now = Date.now() / 1000;
  for (const s of sent.sent) {
    state.sent.unshift({ time: now, device: s.device, what, token: s.token, outcome: "pending", responses: [] });
  }
  for (const s of sent.skipped) {
    state.sent.unshift({ time: now, device: s.device, what, token: "", outcome: "skipped: " + s.reason, responses: [] });
  }
  state.sent.length = Math.min(state.sent.length, MAX_SENT_SHOWN);
  renderSent();
}

async function refreshSent() {
  const open = state.sent.filter((s) => s.token && s.outcome === "pending");
  if (!open.length) return;
  const answer = await call("responses", {}, { tokens: open.map((s) => s.token) });
  answer.tokens.forEach((t, i) => {
    open[i].outcome = t.outcome;
    open[i].responses = t.responses;
  });
  renderSent();
}

function renderSent() {
  const body = $("sent");
  body.replaceChildren();
  for (const s of state.sent) {
    const tr = el("tr");
    tr.append(
      el("td", new Date(s.time * 1000).toLocaleTimeString()),
      el("td", s.device, "mono"),
      el("td", s.what),
      el("td", s.token, "mono"),
      el("td", s.outcome, "status status-" + s.outcome.split(":")[0]),
      el("td", s.responses.map((r) => r.status_name).join(", ")),
    );
    body.append(tr);
  }
}

function commandBody() {
  const target = document.querySelector("input[name=target]:checked").value;
  const who = $("cmd-target").value.trim();
  const b = {};
  if (target === "device") b.device = who;
  else b.group = who;
  const kind = $("cmd-kind").value;
  if (kind === "action") {
    b.action = Number($("cmd-action").value);
    const args = $("cmd-args").value.trim();
    if (args) b.args = bytesToBase64(hexToBytes(args));
  } else if (kind === "data") {
    b.data_id = $("cmd-data-id").value;
    const t = $("cmd-value-type").value;
    const v = $("cmd-value").value;
    if (t === "u64" || t === "i64") {
      if (!/^-?\d+$/.test(v)) throw new Error("not an integer: " + v);
      b.value = { [t]: Number(v) };
      if (!Number.isSafeInteger(b.value[t])) throw new Error("too large for this console: " + v);
    } else if (t === "f64") {
      if (v.trim() === "" || isNaN(Number(v))) throw new Error("not a number: " + v);
      b.value = { f64: Number(v) };
    } else if (t === "bool") {
      if (v !== "true" && v !== "false") throw new Error("true or false");
      b.value = { bool: v === "true" };
    } else if (t === "text") {
      b.value = { text: v };
    } else {
      b.value = { bytes: bytesToBase64(hexToBytes(v)) };
    }
    if ($("cmd-confidential").checked) b.confidential = true;
  } else if (kind === "generic") {
    b.generic = bytesToBase64(hexToBytes($("cmd-generic").value));
  } else {
    b.id_request = true;
  }
  const life = $("cmd-lifetime").value;
  if (life) b.lifetime = Number(life);
  return [b, kind];
}

// --- events ---

async function pollEvents() {
  if (!state.token || $("events-paused").checked) return;
  try {
    const r = await call("events", { after: state.eventsAfter, limit: 500 });
    if (state.eventsRun !== null && r.run !== state.eventsRun) {
      // The server restarted: its numbers start again.
      state.eventsRun = r.run;
      state.eventsAfter = 0;
      $("events").prepend(el("li", "The server restarted.", "event-note"));
      return pollEvents();
    }
    state.eventsRun = r.run;
    const list = $("events");
    if (r.missed > 0) list.prepend(el("li", r.missed + " events were missed (not kept).", "event-note"));
    for (const e of r.events) {
      const li = el("li", null, "event event-" + e.kind);
      li.append(el("time", time(e.time)), " ");
      if (e.device) li.append(el("span", e.device, "mono"), " ");
      li.append(el("span", e.text));
      list.prepend(li);
    }
    while (list.children.length > MAX_EVENTS_SHOWN) list.lastChild.remove();
    state.eventsAfter = r.next;
  } catch (e) {
    if (e.status !== 401) showError("app-error", e);
  }
}

// --- wiring ---

function onKindChange() {
  const kind = $("cmd-kind").value;
  for (const span of document.querySelectorAll("#command [data-kind]")) {
    span.hidden = span.dataset.kind !== kind;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("sign-in").addEventListener("submit", (ev) => {
    ev.preventDefault();
    signIn($("token").value.trim());
  });
  $("sign-out").addEventListener("click", () => signOut(""));
  $("device-filter").addEventListener("input", renderDevices);
  $("cmd-kind").addEventListener("change", onKindChange);
  $("command").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    let body, kind;
    try {
      [body, kind] = commandBody();
    } catch (e) {
      showError("command-error", e);
      return;
    }
    try {
      const sent = await call("command", {}, body);
      track(sent, kind);
      showError("command-error", null);
    } catch (e) {
      showError("command-error", e);
    }
  });
  $("enroll").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const b = {
      groups: $("enroll-groups").value.split(",").map((g) => g.trim()).filter((g) => g),
    };
    const name = $("enroll-name").value.trim();
    if (name) b.name = name;
    const ttl = $("enroll-ttl").value;
    if (ttl) b.ttl_secs = Number(ttl);
    try {
      const r = await call("enroll", {}, b);
      $("enroll-token").value = r.token;
      $("enroll-expires").textContent = time(r.expires);
      $("enroll-result").hidden = false;
      showError("enroll-error", null);
    } catch (e) {
      showError("enroll-error", e);
    }
  });
  $("enroll-copy").addEventListener("click", () => {
    navigator.clipboard.writeText($("enroll-token").value).catch(() => {
      $("enroll-token").select();
    });
  });
  $("enroll-hide").addEventListener("click", () => {
    $("enroll-token").value = "";
    $("enroll-result").hidden = true;
  });
  $("detail-close").addEventListener("click", () => {
    state.detail = null;
    $("device-detail").hidden = true;
  });
  $("detail-start").addEventListener("click", async () => {
    try {
      track(await call("deviceVerb", { id: state.detail, verb: "confidential" }, { start: true }), "confidential");
      showDetail(state.detail);
    } catch (e) {
      showError("app-error", e);
    }
  });
  $("detail-require").addEventListener("click", async () => {
    const required = !$("detail-require").dataset.required;
    try {
      await call("deviceVerb", { id: state.detail, verb: "confidential" }, { start: false, required });
      showDetail(state.detail);
    } catch (e) {
      showError("app-error", e);
    }
  });
  onKindChange();
  const saved = sessionStorage.getItem(TOKEN_KEY);
  if (saved) signIn(saved);
});
