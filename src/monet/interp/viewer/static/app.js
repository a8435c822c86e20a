// Monet atlas viewer. Every piece of corpus text reaches the page through textContent (never innerHTML),
// so a context containing "<script>" is shown as text and never runs.
"use strict";

const $ = (id) => document.getElementById(id);
let INFO = null;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "text") node.textContent = value;
    else if (key === "cls") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) if (child) node.appendChild(child);
  return node;
}

async function api(path) {
  const response = await fetch(path);
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

function show(...nodes) {
  const content = $("content");
  content.replaceChildren(...nodes);
}

function fail(error) { show(el("p", { cls: "error", text: String(error.message || error) })); }

function visible(piece) {
  // Make whitespace visible without changing what the text says.
  return piece.replace(/\n/g, "\u21b5").replace(/\t/g, "\u2192");
}

function pct(value) { return value.toFixed(value >= 10 ? 1 : 2) + "%"; }

function expertLink(group, expert, label) {
  return el("a", { href: `#/expert/${group}/${expert}`, text: label || `${group}:${expert}` });
}

function contextRow(ctx) {
  const cell = el("td", { cls: "ctx" });
  ctx.pieces.forEach((piece, i) => {
    const node = i === ctx.target ? el("mark", { cls: "hit", text: visible(piece), title: pct(ctx.percent) })
                                  : el("span", { text: visible(piece) });
    cell.appendChild(node);
  });
  return el("tr", { cls: "context" }, el("td", { cls: "pct", text: pct(ctx.percent) }),
            el("td", { cls: "lab", text: ctx.label }), cell);
}

function bars(entries, format) {
  const box = el("div", { cls: "bars" });
  const top = Math.max(...entries.map(([, v]) => v), 1e-12);
  for (const [name, value] of entries) {
    box.appendChild(el("span", { text: name }));
    const holder = el("span");
    const bar = el("div", { cls: "bar" });
    bar.style.width = `${(100 * value) / top}%`;
    holder.appendChild(bar);
    box.appendChild(holder);
    box.appendChild(el("span", { cls: "val", text: format(value) }));
  }
  return box;
}

function tokenList(pieces, values, negative) {
  const box = el("div", { cls: negative ? "tokens neg" : "tokens" });
  pieces.forEach((piece, i) => box.appendChild(el("span", { text: visible(piece), title: values[i].toFixed(3) })));
  return box;
}

async function showExpert(group, expert) {
  $("group").value = String(group);
  $("expert").value = String(expert);
  const data = await api(`/api/expert/${group}/${expert}`);
  const title = el("h2", { id: "expert-title", text: `Group ${data.group} / Expert ${data.expert.toLocaleString()}` });
  const stats = el("p", { cls: "stats", text:
    `${data.count.toLocaleString()} activations · density ${data.density.toExponential(2)} · ` +
    `mean score ${data.mean_score.toFixed(4)} · best ${pct(data.max_percent)} of a token's routing` });
  const table = el("table", { cls: "contexts", id: "contexts" });
  data.contexts.forEach((ctx) => table.appendChild(contextRow(ctx)));
  const labels = Object.entries(data.label_share).sort((a, b) => b[1] - a[1]);
  const nodes = [title, stats, el("h3", { text: "Top activating contexts" }),
    data.contexts.length ? table : el("p", { cls: "hint", text: "No contexts: this expert never fired on the atlas corpus." }),
    el("h3", { text: "Routing probability by label" }),
    el("div", { id: "labels" }, bars(labels, (v) => pct(100 * v)))];
  const hist = data.histogram;
  const histEntries = hist.counts.map((c, i) => [`≥ ${hist.edges[i].toPrecision(2)}%`, c]);
  nodes.push(el("h3", { text: "Score histogram (share of a token's routing)" }), bars(histEntries, (v) => String(v)));
  if (data.logits) {
    nodes.push(el("h3", { text: "Promoted tokens" }), tokenList(data.logits.pos_str, data.logits.pos_values, false));
    nodes.push(el("h3", { text: "Suppressed tokens" }), tokenList(data.logits.neg_str, data.logits.neg_values, true));
  } else if (INFO && !INFO.has_model) {
    nodes.push(el("p", { cls: "hint", text: "Start `monet view ATLAS --run RUN` to see the tokens this expert promotes." }));
  }
  show(...nodes);
  document.title = `Expert ${group}:${expert} – Monet atlas`;
}

function expertList(rows, describe) {
  const list = el("ul", { cls: "experts" });
  for (const row of rows) {
    const item = el("li");
    item.appendChild(expertLink(row.group, row.expert));
    item.appendChild(el("span", { text: " " + describe(row) }));
    list.appendChild(item);
  }
  return list;
}

async function showToken(text) {
  $("token").value = text;
  const rows = await api(`/api/token?q=${encodeURIComponent(text)}`);
  show(el("h2", { text: `Experts of the token “${text}”` }),
       rows.length ? expertList(rows, (r) => `${r.contexts} of its top contexts on “${visible(r.piece)}”, best ${pct(r.max_percent)}`)
                   : el("p", { cls: "hint", text: "No expert has this token among its top contexts." }));
}

async function showLabel(label) {
  $("label").value = label;
  const rows = await api(`/api/label/${encodeURIComponent(label)}`);
  show(el("h2", { text: `Experts most specific to “${label}”` }),
       expertList(rows, (r) => `skewness ${typeof r.skewness === "number" ? r.skewness.toFixed(2) : "∞ (this label only)"} · ${r.count.toLocaleString()} activations`));
}

async function route() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  try {
    if (parts[0] === "expert" && parts.length === 3) await showExpert(Number(parts[1]), Number(parts[2]));
    else if (parts[0] === "token" && parts.length >= 2) await showToken(parts.slice(1).join("/"));
    else if (parts[0] === "label" && parts.length === 2) await showLabel(parts[1]);
  } catch (error) { fail(error); }
}

async function start() {
  try {
    INFO = await api("/api/info");
  } catch (error) { fail(error); return; }
  $("summary").textContent = `${INFO.kind} model · ${INFO.groups.length} groups × ${INFO.experts.toLocaleString()} experts · ` +
    `${INFO.tokens.toLocaleString()} tokens · labels: ${INFO.labels.join(", ")}`;
  for (const g of INFO.groups) $("group").appendChild(el("option", { value: String(g), text: String(g) }));
  for (const l of INFO.labels) $("label").appendChild(el("option", { value: l, text: l }));
  $("expert").max = String(INFO.experts - 1);
  $("picker").addEventListener("submit", (event) => {
    event.preventDefault();
    location.hash = `#/expert/${$("group").value}/${$("expert").value}`;
  });
  $("random").addEventListener("click", async () => {
    try {
      const pick = await api(`/api/random?group=${$("group").value}`);
      location.hash = `#/expert/${pick.group}/${pick.expert}`;
    } catch (error) { fail(error); }
  });
  $("search").addEventListener("submit", (event) => {
    event.preventDefault();
    if ($("token").value) location.hash = `#/token/${encodeURIComponent($("token").value)}`;
  });
  $("bylabel").addEventListener("click", () => { location.hash = `#/label/${encodeURIComponent($("label").value)}`; });
  window.addEventListener("hashchange", route);
  await route();
}

start();
