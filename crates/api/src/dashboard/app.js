// Phoenix's dashboard: renders /api/state and keeps it current with server-sent events;
// graphs are SVG images drawn by the server; logs stream per role. No library, no CDN.
"use strict";

const $ = (id) => document.getElementById(id);
let range = "1h";
let roles = [];
let logSource = null;
let paused = false;

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (key === "dataset") Object.assign(node.dataset, value);
    else if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child != null) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function time(at) {
  const date = new Date(at);
  return el("time", { datetime: at, title: at }, date.toLocaleTimeString());
}

function health(instance) {
  if (instance.status === "healthy" || instance.status === "unhealthy") return instance.status;
  return instance.status;
}

function renderRole(role) {
  const live = role.generations.find((g) => g.status === "live");
  const others = role.generations.filter((g) => g !== live);
  const state = role.deploying ? "deploying" : (live ? "live" : "no live generation");
  const card = el("article", {
    class: "role",
    dataset: { role: role.name, liveGeneration: role.live_generation ?? "" },
    "aria-labelledby": "role-" + role.name,
  });
  card.append(el("header", {},
    el("h3", { id: "role-" + role.name }, role.name),
    el("span", { class: "badge " + (role.deploying ? "deploying" : "live") }, state)));
  const healthy = live ? live.instances.filter((i) => i.status === "healthy").length : 0;
  card.append(el("dl", {},
    el("dt", {}, "Generation"), el("dd", { class: "generation" }, role.live_generation ?? "none"),
    el("dt", {}, "Image"), el("dd", { class: "image" }, role.image_name || role.image || "none"),
    el("dt", {}, "Instances"), el("dd", {}, `${healthy} healthy of ${role.desired_instances} wanted`),
    el("dt", {}, "Listen"), el("dd", {}, role.listen),
    el("dt", {}, "Requests"), el("dd", {}, `${role.requests} (${role.proxy_errors} proxy errors)`)));
  for (const generation of [live, ...others].filter(Boolean)) {
    const list = el("ul", { class: "instances", "aria-label": `generation ${generation.id} instances` });
    for (const instance of generation.instances) {
      list.append(el("li", { dataset: { instance: instance.name, generation: generation.id } },
        el("span", {}, instance.name),
        el("span", { class: "badge " + health(instance) }, health(instance)),
        el("span", {}, `gen ${generation.id}`)));
    }
    card.append(el("p", {}, `Generation ${generation.id} (${generation.status})`), list);
  }
  return card;
}

function summary(entry) {
  const detail = entry.detail || {};
  const parts = [];
  for (const key of ["generation", "image", "from", "to", "instances", "reason", "error", "actor", "call"]) {
    if (detail[key] !== undefined && typeof detail[key] !== "object") parts.push(`${key} ${detail[key]}`);
  }
  return parts.join(", ");
}

function renderTimeline(history) {
  const list = $("timeline");
  list.replaceChildren();
  for (const entry of history.slice().reverse()) {
    list.append(el("li", { dataset: { kind: entry.kind } },
      time(entry.at), el("span", {}, entry.role || "fleet"),
      el("span", {}, el("strong", {}, entry.kind), " ", summary(entry))));
  }
}

function fillSelect(select, names) {
  const current = select.value;
  if ([...select.options].map((o) => o.value).join() === names.join()) return;
  select.replaceChildren(...names.map((name) => el("option", { value: name }, name)));
  if (names.includes(current)) select.value = current;
}

function renderGraphs() {
  const role = $("graph-role").value;
  const box = $("graphs");
  box.replaceChildren();
  if (!role) return;
  const stamp = Date.now();
  for (const graph of ["requests", "latency", "cpu", "memory"]) {
    box.append(el("img", {
      src: `/api/graph/${encodeURIComponent(role)}/${graph}?range=${range}&t=${stamp}`,
      alt: `${role}: ${graph} over the last ${range}`,
      width: "600", height: "180",
    }));
  }
}

function render(state) {
  roles = state.status.roles.map((r) => r.name);
  $("roles").replaceChildren(...state.status.roles.map(renderRole));
  if (!roles.length) $("roles").append(el("p", {}, "No roles."));
  renderTimeline(state.history);
  const graphRole = $("graph-role").value;
  fillSelect($("graph-role"), roles);
  if ($("graph-role").value !== graphRole) renderGraphs();
  const logRole = $("log-role").value;
  fillSelect($("log-role"), roles);
  if ($("log-role").value !== logRole) followLogs();
}

function connection(state, text) {
  const node = $("connection");
  node.dataset.state = state;
  node.textContent = text;
}

function followLogs() {
  if (logSource) logSource.close();
  const list = $("logs");
  list.replaceChildren();
  const role = $("log-role").value;
  if (!role) return;
  logSource = new EventSource(`/api/logs/${encodeURIComponent(role)}`);
  logSource.addEventListener("line", (message) => {
    if (paused) return;
    const line = JSON.parse(message.data);
    list.append(el("li", { class: line.stream === "stderr" ? "err" : "" },
      time(line.at), " ", el("span", { class: "who" }, line.instance), " ", line.text));
    while (list.childElementCount > 500) list.firstElementChild.remove();
    list.scrollTop = list.scrollHeight;
  });
}

function start() {
  const events = new EventSource("/api/events");
  events.addEventListener("state", (message) => {
    connection("live", "live");
    render(JSON.parse(message.data));
  });
  events.addEventListener("error", () => connection("lost", "reconnecting…"));
  $("graph-role").addEventListener("change", renderGraphs);
  $("log-role").addEventListener("change", followLogs);
  for (const button of document.querySelectorAll("#ranges button")) {
    button.addEventListener("click", () => {
      range = button.dataset.range;
      for (const other of document.querySelectorAll("#ranges button")) {
        other.setAttribute("aria-pressed", String(other === button));
      }
      renderGraphs();
    });
  }
  $("log-pause").addEventListener("click", (event) => {
    paused = !paused;
    event.target.setAttribute("aria-pressed", String(paused));
    event.target.textContent = paused ? "Resume" : "Pause";
  });
  setInterval(renderGraphs, 15000);
}

start();
