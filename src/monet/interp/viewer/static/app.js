// Monet atlas viewer. Every piece of corpus text reaches the page through textContent (never innerHTML),
// so a context containing "<script>" is shown as text and never runs. Control and bidirectional characters
// arrive from the server as visible symbols (monet.io.printable) and are made visible here again for text
// that never went through the server (the address bar), so nothing on the page is reordered or hidden.
"use strict";

const $ = (id) => document.getElementById(id);
let INFO = null;
let NAV = 0;   // navigation generation: a page whose data arrives after a newer navigation is not shown
let LOADING = null;   // the timer that shows "loading…" when a page is slow to arrive

const HIDDEN = /[\u0000-\u0008\u000b-\u001f\u007f-\u009f\u061c\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff]/g;

function capital(word) {
  return word.charAt(0).toUpperCase() + word.slice(1);
}

// What this atlas calls its units ("expert" for Monet, "neuron" for a dense baseline; /api/info).
function unitWord(plural) { return plural ? `${INFO.unit_word}s` : INFO.unit_word; }
function valueName() { return INFO.coactive ? "share of each token's routing" : "activation on each token"; }

function safe(text) {
  return String(text).replace(HIDDEN, (c) => {
    const code = c.codePointAt(0);
    if (code < 0x20) return String.fromCodePoint(0x2400 + code);
    if (code === 0x7f) return "\u2421";
    return `⟨U+${code.toString(16).toUpperCase().padStart(4, "0")}⟩`;
  });
}

function visible(piece) {
  // Make whitespace visible without changing what the text says.
  return safe(piece).replace(/\n/g, "\u21b5").replace(/\t/g, "\u2192");
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "text") node.textContent = safe(value);
    else if (key === "cls") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) if (child) node.appendChild(child);
  return node;
}

async function api(path, body) {
  const options = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  };
  const response = await fetch(path, options);
  let data;
  try { data = await response.json(); } catch (error) { throw new Error(`${response.status} ${response.statusText}`); }
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

function show(nav, ...nodes) {
  if (nav !== NAV) return false;   // the user has gone elsewhere meanwhile
  clearTimeout(LOADING);
  $("content").replaceChildren(...nodes);
  return true;
}

function fail(nav, error) { show(nav, el("p", { cls: "error", text: String(error.message || error) })); }

function pct(value) {
  if (value === null || value === undefined) return "–";
  if (value === 0) return "0%";
  return value.toPrecision(value >= 10 ? 3 : 2) + "%";
}

function count(value) { return Number(value).toLocaleString("en-US"); }

function expertLink(group, expert, label) {
  return el("a", { href: `#/expert/${group}/${expert}`, text: label || `${group}:${expert}` });
}

// ------------------------------------------------------------------------------------------ tokens

function heat(node, value, max) {
  if (value === null || value === undefined) { node.classList.add("unknown"); return; }
  const alpha = max > 0 ? Math.min(1, value / max) : 0;
  if (alpha > 0) node.style.backgroundColor = `rgba(255, 128, 0, ${(0.08 + 0.92 * alpha).toFixed(3)})`;
}

function tokenSpans(pieces, values, target, max, options) {
  const opts = options || {};
  const box = el("span", { cls: opts.cls || "tokens-line" });
  pieces.forEach((piece, i) => {
    const text = opts.lines ? visible(piece).replace(/\u21b5/g, "\u21b5\n") : visible(piece);
    const span = el("span", { cls: i === target ? "tok hit" : "tok", text });
    const value = values ? values[i] : (i === target ? opts.targetValue : null);
    span.title = value === null || value === undefined ? "value not stored" : pct(value);
    if (values || (i === target && value !== null && value !== undefined)) heat(span, value, max);
    box.appendChild(span);
  });
  return box;
}

function legend(max, note) {
  const box = el("div", { cls: "legend" });
  box.appendChild(el("span", { text: "0%" }));
  box.appendChild(el("span", { cls: "scale" }));
  box.appendChild(el("span", { text: pct(max) }));
  box.appendChild(el("span", { cls: "hint", text: note }));
  return box;
}

function contextTable(contexts, max, group, expert, id) {
  const table = el("table", { cls: "contexts" });
  if (id) table.id = id;
  for (const ctx of contexts) {
    const cell = el("td", { cls: "ctx" }, tokenSpans(ctx.pieces, ctx.values, ctx.target, max,
                                                      { targetValue: ctx.percent }));
    const doc = el("td", { cls: "doc" }, el("a", { href: `#/doc/${ctx.doc}/${ctx.pos}/${group}/${expert}`,
                                                   text: "document", title: `document ${ctx.doc}, token ${ctx.pos}` }));
    table.appendChild(el("tr", { cls: "context" }, el("td", { cls: "pct", text: pct(ctx.percent) }),
                         el("td", { cls: "lab", text: ctx.label }), cell, doc));
  }
  return table;
}

function bars(entries, id) {
  const box = el("div", { cls: "bars" });
  if (id) box.id = id;
  const top = Math.max(...entries.map((e) => e[1]), 1e-12);
  for (const [name, value, text] of entries) {
    box.appendChild(el("span", { cls: "name", text: name }));
    const holder = el("span", { cls: "track" });
    const bar = el("div", { cls: value > 0 ? "bar" : "bar zero" });   // a tiny value shows a sliver; 0 none
    bar.style.width = `${(100 * value) / top}%`;
    holder.appendChild(bar);
    box.appendChild(holder);
    box.appendChild(el("span", { cls: "val", text }));
  }
  return box;
}

function tokenList(pieces, values, negative) {
  // Each token with its logit change (the expert's output direction through the unembedding), shown, not hidden.
  const box = el("div", { cls: negative ? "tokens neg" : "tokens" });
  pieces.forEach((piece, i) => {
    const value = values[i];
    box.appendChild(el("span", { cls: "logit" }, el("span", { cls: "piece", text: visible(piece) }),
      el("span", { cls: "value", text: (value >= 0 ? "+" : "") +
                   (Math.abs(value) >= 0.01 || value === 0 ? value.toFixed(2) : value.toExponential(1)) })));
  });
  return box;
}

// ------------------------------------------------------------------------------------------ expert

async function showExpert(nav, group, expert) {
  $("group").value = String(group);
  $("expert").value = String(expert);
  const data = await api(`/api/expert/${group}/${expert}`);
  const max = Math.max(data.max_percent, 1e-9);
  const halves = data.i === undefined ? "" : ` (i ${data.i}, j ${data.j})`;
  const title = el("h2", { id: "expert-title", text: `${capital(INFO.group_word)} ${data.group} / ${capital(INFO.unit_word)} ${data.expert}` });
  const tools = el("p", { cls: "tools" },
    el("span", { cls: "hint", text: `${unitWord()} id ${data.group}:${data.expert}${halves} · ` }),
    el("a", { id: "export", href: `/api/export/${group}/${expert}`, download: `monet-${unitWord()}-${group}-${expert}.json`,
              text: "JSON export (as monet atlas export)" }));
  const stats = el("p", { cls: "stats", text:
    `${count(data.count)} activations · density ${data.density.toExponential(2)} · ` +
    `mean ${pct(data.mean_percent)} · ` +
    `best ${pct(data.max_percent)} ${INFO.score_word}` });
  const nodes = [title, tools, stats];
  const note = INFO.has_values ? `colour: the ${unitWord()}'s ${valueName()} (hover a token for its value)`
                               : "this atlas (format 1) stores only the activating token's value";
  nodes.push(legend(max, note));
  nodes.push(el("h3", { text: "Top activating contexts" }));
  nodes.push(data.contexts.length ? contextTable(data.contexts, max, group, expert, "contexts")
                                  : el("p", { cls: "hint", text: `No contexts: this ${unitWord()} never fired on the atlas corpus.` }));
  if (INFO.has_images) {   // a VisionMonet atlas (format 3)
    nodes.push(el("h3", { text: "Top images (each routed alone; outlined: the patch that routed most to the expert)" }));
    nodes.push(data.images && data.images.length ? imageTiles(data.images)
               : el("p", { cls: "hint", text: "No images: this expert never fired on the atlas's images." }));
  }
  nodes.push(el("h3", { text: "Examples by activation band" }));
  if (!INFO.has_values || INFO.samples === 0) {
    nodes.push(el("p", { cls: "hint", text: "This atlas keeps no samples by activation band (rebuild it with this monet)." }));
  } else if (data.bands.length) {
    const box = el("div", { id: "bands" });
    for (const band of data.bands) {
      const low = band.band === 0 ? "below" : `${pct(band.low_percent)} –`;
      box.appendChild(el("h4", { cls: "band", text:
        `${low} ${pct(band.high_percent)} ${INFO.score_word} · ${(100 * band.share).toFixed(1)}% of its ` +
        `activations (${count(band.count)}), ${band.contexts.length} at random` }));
      box.appendChild(contextTable(band.contexts, max, group, expert));
    }
    nodes.push(box);
  } else {
    nodes.push(el("p", { cls: "hint", text: "No activations." }));
  }
  nodes.push(el("h3", { text: INFO.coactive ? "Routing probability by label" : "Activation by label" }));
  const labels = Object.entries(data.label_share).sort((a, b) => b[1] - a[1]).map(([label, share]) => {
    const n = data.label_count ? `${count(data.label_count[label])} act. / ` : "";
    return [label, share, `${pct(100 * share)} · ${n}${count(data.label_tokens[label])} tokens`];
  });
  nodes.push(bars(labels, "labels"));
  const hist = data.histogram_view;
  nodes.push(el("h3", { text: `Score histogram (${INFO.score_word}; bins from the data)` }));
  if (hist.counts.length) {
    nodes.push(bars(hist.counts.map((c, i) => [`${pct(hist.edges[i])} – ${pct(hist.edges[i + 1])}`, c, count(c)]),
                    "histogram"));
  } else {
    nodes.push(el("p", { cls: "hint", text: "No activations." }));
  }
  if (INFO.has_model && data.count) {
    // Computed with the model (a forward pass per top context): the page shows the atlas at once and fills
    // this in when it arrives.
    nodes.push(el("div", { id: "logits" }, el("h3", { text: "Promoted and suppressed tokens (logit change)" }),
                  el("p", { cls: "hint loading", id: "logits-computing", text: "computing with the model…" })));
  }
  nodes.push(...modelSections(group, expert, max, data.contexts));
  if (!show(nav, ...nodes)) return;
  document.title = `${capital(INFO.unit_word)} ${group}:${expert} – Monet atlas`;
  if (INFO.has_model) loadModelParts(nav, group, expert, data.count > 0);
}

async function loadModelParts(nav, group, expert, logits) {
  if (logits) {
    try {
      const out = await api(`/api/logits/${group}/${expert}`);
      if (nav !== NAV || !$("logits")) return;
      $("logits").replaceChildren(
        el("h3", { text: "Promoted tokens (logit change)" }),
        tokenList(out.logits.pos_str, out.logits.pos_values, false),
        el("h3", { text: "Suppressed tokens (logit change)" }),
        tokenList(out.logits.neg_str, out.logits.neg_values, true));
    } catch (error) {
      if (nav === NAV && $("logits")) $("logits").replaceChildren(el("p", { cls: "error", text: String(error.message) }));
    }
  }
  if (INFO.coactive) loadSimilar(nav, group, expert);   // a dense model's neurons have no routing to compare
}

function imageTiles(images) {
  // Each image at its stored pixels, scaled up; the patch is a box placed in percent of the image's side.
  const box = el("div", { id: "images", cls: "images" });
  for (const im of images) {
    const side = 100 / im.grid;
    const patch = el("span", { cls: "patch", title: `patch ${im.patch} (row ${im.row}, column ${im.col})` });
    Object.assign(patch.style, { left: `${im.col * side}%`, top: `${im.row * side}%`, width: `${side}%`,
                                 height: `${side}%` });
    const frame = el("div", { cls: "frame" }, el("img", { src: `/api/image/${im.image}`, alt: safe(im.id) }), patch);
    box.appendChild(el("figure", { cls: "tile", title: safe(im.caption) }, frame,
      el("figcaption", { text: `${pct(im.percent)} · ${im.label}` }),
      el("figcaption", { cls: "caption", text: im.caption })));
  }
  return box;
}

function modelSections(group, expert, max, contexts) {
  if (!INFO.has_model) {
    const unit = INFO.unit_word;
    const titles = ["Test activation", ...(INFO.coactive ? [`similar ${unit}s`] : []), ...(INFO.steerable ? ["steering"] : [])];
    const offers = [`test this ${unit} on your own text`, ...(INFO.coactive ? [`find similar ${unit}s`] : []),
                    ...(INFO.steerable ? ["steer generation with it"] : [])];
    return [el("h3", { text: titles.join(" · ") }),
            el("p", { cls: "hint", id: "needs-model", text: "Start the viewer with the model, `monet view ATLAS --run RUN`, " +
              `to ${offers.slice(0, -1).join(", ")}${offers.length > 1 ? " and " : ""}${offers[offers.length - 1]}.` })];
  }
  const limits = INFO.limits;
  const probeText = el("textarea", { id: "probe-text", rows: "3", maxlength: String(limits.text_chars),
                                     placeholder: `Type text to see this ${INFO.unit_word}'s value on each token` });
  const probeOut = el("div", { id: "probe-out", cls: "probe" });
  const probeRun = el("button", { type: "button", id: "probe-run", text: "run" });
  probeRun.addEventListener("click", async () => {
    probeOut.replaceChildren(el("p", { cls: "hint", text: "running…" }));
    try {
      const out = await api("/api/activation", { group, expert, text: probeText.value });
      const scale = Math.max(out.max, max, 1e-9);
      const best = out.values.indexOf(out.max);
      probeOut.replaceChildren(tokenSpans(out.pieces, out.values, -1, scale, { cls: "tokens-line probe-line" }),
        el("p", { cls: "hint", text: out.max > 0 ? `highest ${pct(out.max)} on “${visible(out.pieces[best])}”`
                                                 : `the ${INFO.unit_word} is not active on any token of this text` }));
    } catch (error) { probeOut.replaceChildren(el("p", { cls: "error", text: String(error.message) })); }
  });
  const prompt = el("textarea", { id: "steer-prompt", rows: "3", maxlength: String(limits.prompt_chars),
                                  placeholder: "prompt (several lines are fine)" });
  const guess = suggestedAlpha(contexts);
  const alpha = el("input", { id: "steer-alpha", type: "number", step: "any", value: String(guess),
                              min: String(-limits.alpha), max: String(limits.alpha) });
  const tokens = el("input", { id: "steer-tokens", type: "number", min: "1", max: String(limits.max_new_tokens),
                               value: "24" });
  const steerOut = el("div", { id: "steer-out", cls: "steer" });
  const suggestion = el("div", { id: "steer-suggestion" });
  const steerRun = el("button", { type: "button", id: "steer-run", text: "generate" });
  const find = el("button", { type: "button", id: "steer-find", text: "find α" });
  const useContext = el("button", { type: "button", id: "steer-use-context", text: "use a top context as the prompt" });
  const request = () => ({ group, expert, prompt: prompt.value, max_new_tokens: Number(tokens.value) });
  const useAlpha = (value) => { alpha.value = String(value); };
  let finding = 0, steering = 0;   // the latest search and steering: an older one stops showing itself
  const findAlpha = async () => {
    // The smallest α of a short ladder whose greedy text differs on this prompt, checked by the server.
    const mine = ++finding;
    const alive = () => suggestion.isConnected && mine === finding;
    suggestion.replaceChildren(el("p", { cls: "hint loading", text: "finding the smallest α that changes the text…" }));
    try {
      const out = await follow(await api("/api/alpha", request()), alive, (job) => {
        suggestion.replaceChildren(el("p", { cls: "hint loading", text: jobStage(job) }));
      });
      if (out && out.ladder.alpha !== null) useAlpha(out.ladder.alpha);
      if (out) suggestion.replaceChildren(ladderNote(out, null));
    } catch (error) { if (alive()) suggestion.replaceChildren(el("p", { cls: "error", text: String(error.message) })); }
  };
  let nextContext = 0;
  useContext.addEventListener("click", () => {
    // The context up to and including its activating token: the expert usually fires on the prompt's last
    // token there (the stored context is a window, so the routing can differ a little), and steering then
    // changes the very next token. α is then found for this prompt.
    const ctx = contexts[nextContext++ % contexts.length];
    prompt.value = ctx.pieces.slice(0, ctx.target + 1).join("");
    findAlpha();
  });
  if (!contexts.length) useContext.disabled = true;
  find.addEventListener("click", findAlpha);
  prompt.addEventListener("input", () => { finding++; suggestion.replaceChildren(); });   // α found holds for its prompt
  steerRun.addEventListener("click", async () => {
    const mine = ++steering;
    const alive = () => steerOut.isConnected && mine === steering;
    steerOut.replaceChildren(el("p", { cls: "hint loading", text: "starting…" }));
    try {
      // The text arrives as it is generated: the server answers within half a second with what is there.
      await follow(await api("/api/steer", { ...request(), alpha: Number(alpha.value) }), alive,
                   (job) => steerOut.replaceChildren(...steerView(job, group, expert, useAlpha, steerRun)));
    } catch (error) { if (alive()) steerOut.replaceChildren(el("p", { cls: "error", text: String(error.message) })); }
  });
  // A dense model's neurons have no routing to compare and no term to scale: no similar units, no steering.
  const similar = INFO.coactive ? [
    el("h3", { text: "Similar experts" }),
    el("div", { id: "similar" }, el("p", { cls: "hint loading", text: "computing co-activation and output directions…" })),
  ] : [];
  return [
    el("h3", { text: "Test activation" }), probeText, el("div", { cls: "row" }, probeRun), probeOut, ...similar,
    ...(INFO.steerable ? steeringSection() : []),
  ];

  function steeringSection() {
    return [
      el("h3", { text: "Steering (greedy decoding, this expert's term scaled by α in every layer of its group)" }),
      el("p", { cls: "hint", text: "Scaling acts only where the router picks the expert: on a prompt where it never " +
        "fires nothing changes until it does; a top context as the prompt (cut after the token it fires on) " +
        "usually makes it fire on the last prompt token. " +
        `α starts at a first guess, ${guess} (100% over its median share on its top contexts, so that its term ` +
        "weighs about a whole token's routing). Whether an α changes the text depends on the prompt: " +
        `“find α” tries α = ${LADDER_TEXT} on yours and sets the smallest that changes the greedy text ` +
        "(a top context as the prompt does this by itself)." }),
      prompt,
      el("div", { cls: "row" }, useContext, el("label", { text: "α " }, alpha), find,
         el("label", { text: "new tokens " }, tokens), steerRun),
      suggestion,
      steerOut,
    ];
  }
}

const LADDER_TEXT = "2, 5, 10, 20, 50, 100, 200, 500, 1000";   // steering.LADDER

async function follow(job, alive, render) {
  // A steering job, read again as it grows until it is done; null once `alive()` is false (the page or the
  // section moved on: another expert, a newer request, an edited prompt).
  for (;;) {
    if (!alive()) return null;
    if (job.status === "error") throw new Error(job.error);
    render(job);
    if (job.status !== "running") return job;
    job = await api(`/api/steer/${job.job}?seen=${job.version}`);
  }
}

function jobStage(job) {
  const of = (n) => `${n} of ${job.max_new_tokens} new tokens`;
  if (job.stage === "queued") return "waiting for the model…";
  if (job.stage === "unsteered") return `generating the unsteered text… ${of(job.unsteered_tokens)}`;
  if (job.stage === "steered") return `generating with α = ${job.alpha}… ${of(job.steered_tokens)}`;
  if (job.stage === "ladder") {
    const tried = job.ladder.tried.length;
    const next = job.ladder.alphas[Math.min(tried, job.ladder.alphas.length - 1)];
    return (job.kind === "steer" ? `the text did not change at α = ${job.alpha}; ` : "") +
      `trying α = ${next} (${tried + 1} of ${job.ladder.alphas.length})…`;
  }
  return "";
}

function steerView(job, group, expert, useAlpha, run) {
  const nodes = [];
  if (job.status === "running") nodes.push(el("p", { id: "steer-stage", cls: "hint loading", text: jobStage(job) }));
  else nodes.push(el("p", { id: "steer-activity", cls: job.active_tokens ? "hint" : "warning", text: steerActivity(job) }));
  const steered = job.steered === null ? "(after the unsteered text)" : job.steered;
  nodes.push(el("div", { cls: "columns" },
    el("div", { cls: "column" }, el("h4", { text: "unsteered" }), el("pre", { id: "steer-plain", text: job.unsteered || "" })),
    el("div", { cls: "column" }, el("h4", { text: `expert ${group}:${expert} × ${job.alpha}` }),
       el("pre", { id: job.status === "running" ? "steer-steered-partial" : "steer-steered", text: steered }))));
  if (job.status !== "running" && job.ladder) nodes.push(ladderNote(job, () => { useAlpha(job.ladder.alpha); run.click(); }));
  return nodes;
}

function ladderNote(job, rerun) {
  // What the ladder found on this prompt: the smallest α that changes the greedy text, or why none does.
  const ladder = job.ladder;
  if (ladder.alpha !== null) {
    const box = el("p", { id: "steer-ladder", cls: "hint", text: `At α = ${ladder.alpha} the text changes from new ` +
      `token ${ladder.changed_at} (the smallest of α = ${ladder.alphas.join(", ")} that changes it on this prompt, ` +
      "checked by generating it). " });
    if (rerun) box.appendChild(el("button", { type: "button", id: "steer-use-alpha", text: `generate with α = ${ladder.alpha}` }));
    if (rerun) box.lastChild.addEventListener("click", rerun);
    return box;
  }
  const last = ladder.alphas[ladder.alphas.length - 1];
  const why = job.active_tokens ? `the expert is active on ${job.active_tokens} of the ${job.prompt_tokens} prompt ` +
    `tokens (at most ${pct(job.active_max_percent)} of a token's routing), and scaling its term up to ${last}× ` +
    "never moves the greedy choice" : "the expert is not active on any prompt token, so its term can act only on " +
    `new tokens where it fires, and scaled up to ${last}× it never moves the greedy choice there`;
  return el("p", { id: "steer-ladder", cls: "warning", text: `No α up to ${last} changes the first ` +
    `${job.max_new_tokens} new tokens on this prompt: ${why}. Try “use a top context as the prompt”, another ` +
    "prompt or more new tokens." });
}

function suggestedAlpha(contexts) {
  const shares = contexts.map((c) => c.percent).filter((v) => v > 0).sort((a, b) => a - b);
  if (!shares.length) return 10;
  const median = shares[Math.floor(shares.length / 2)];
  return Math.min(INFO.limits.alpha, Math.max(2, Math.round(100 / median)));
}

function steerActivity(out) {
  const where = `The expert is active on ${out.active_tokens} of the ${out.prompt_tokens} prompt tokens`;
  const change = out.changed_at ? ` The steered text differs from new token ${out.changed_at}.` : "";
  if (!out.active_tokens) {
    return `${where}: α cannot act until the router picks it` + (out.changed ? "." + change : ", and the text did not change.");
  }
  const last = out.last_token_active ? " including the last one" : " (not the last one)";
  return `${where}${last}; at most ${pct(out.active_max_percent)} of a token's routing.` +
    (out.changed ? change : ` The steered text equals the unsteered one at α = ${out.alpha}.`);
}

async function loadSimilar(nav, group, expert) {
  // The server answers within a second or two; while the table is being computed (in the background, off the
  // lock other pages need) it says so, and the page asks again.
  let data;
  for (;;) {
    try {
      data = await api(`/api/similar/${group}/${expert}`);
    } catch (error) {
      if (nav === NAV && $("similar")) $("similar").replaceChildren(el("p", { cls: "error", text: String(error.message) }));
      return;
    }
    if (nav !== NAV || !$("similar")) return;
    if (data.status === "done") break;
    const note = data.experts.length
      ? `computing output directions: ${data.directions_done} of ${data.directions}…`
      : "computing co-activation on the top contexts…";
    $("similar").replaceChildren(el("p", { cls: "hint loading", id: "similar-computing", text: note }),
                                 ...(data.experts.length ? [similarTable(data)] : []));
    await new Promise((resolve) => setTimeout(resolve, 700));
  }
  $("similar").replaceChildren(
    el("p", { cls: "hint", text: "Experts active on the same tokens as this expert's top contexts (co-activation; lift = " +
      "that rate over their rate on the whole corpus), and the cosine between the two experts' output directions " +
      "(each one's mean output over its own top contexts)." }),
    data.experts.length ? similarTable(data) : el("p", { cls: "hint", text: "No other expert fires on these tokens." }));
}

function similarTable(data) {
  const table = el("table", { cls: "similar", id: "similar-table" });
  table.appendChild(el("tr", {}, el("th", { text: "expert" }), el("th", { text: "fires in its top contexts" }),
    el("th", { text: "mean share there" }), el("th", { text: "lift" }), el("th", { text: "output cosine" })));
  for (const row of data.experts) {
    const cosine = row.cosine === null || row.cosine === undefined ? "–" : row.cosine.toFixed(2);
    const cos = el("td", { cls: "num", text: cosine });
    if (typeof row.cosine === "number") cos.classList.add(row.cosine >= 0 ? "pos" : "neg");
    table.appendChild(el("tr", {}, el("td", {}, expertLink(row.group, row.expert)),
      el("td", { cls: "num", text: `${row.contexts} of ${data.contexts}` }), el("td", { cls: "num", text: pct(row.mean_percent) }),
      el("td", { cls: "num", text: row.lift === null ? "∞" : `${row.lift.toPrecision(3)}×` }), cos));
  }
  return table;
}

// ------------------------------------------------------------------------------------- other pages

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

async function showToken(nav, text, match) {
  $("token").value = text;
  $("match").value = match;
  const data = await api(`/api/token?q=${encodeURIComponent(text)}&match=${match}`);
  const what = match === "substring" ? `${capital(unitWord(true))} of the tokens containing “${visible(text)}”`
                                     : `${capital(unitWord(true))} of the token “${visible(text)}”`;
  const describe = match === "substring"
    ? (r) => `${r.contexts} of its top contexts on ${r.pieces.map((p) => `“${visible(p)}”`).join(", ")}, best ${pct(r.max_percent)}`
    : (r) => `${r.contexts} of its top contexts on “${visible(r.piece)}”, best ${pct(r.max_percent)}`;
  show(nav, el("h2", { text: what }),
       el("p", { cls: "hint", text: `${count(data.tokens)} vocabulary token(s) matched · ${data.experts.length} ${unitWord(true)}` }),
       data.experts.length ? expertList(data.experts, describe)
                           : el("p", { cls: "hint", text: `No ${unitWord()} has this token among its top contexts.` }));
}

async function showLabel(nav, label, minCount) {
  $("label").value = label;
  $("min-count").value = String(minCount);
  const data = await api(`/api/label/${encodeURIComponent(label)}?min_count=${minCount}`);
  const describe = (r) => {
    const skew = typeof r.skewness === "number" ? r.skewness.toFixed(2) : "∞ (this label only)";
    const own = r.label_count === null || r.label_count === undefined ? "" : `, ${count(r.label_count)} on “${label}”`;
    return `skewness ${skew} · ${count(r.count)} activations${own} · ${pct(100 * r.label_share)} of its ` +
           `${INFO.coactive ? "routing probability" : "activation"} · best ${pct(r.max_percent)}`;
  };
  show(nav, el("h2", { text: `${capital(unitWord(true))} most specific to “${label}”` }),
       el("p", { cls: "hint", text: `${unitWord(true)} with at least ${count(data.min_count)} activations, ranked by ` +
         `skewness (${INFO.coactive ? "routing probability" : "activation"} on this label over the largest on any other)` }),
       data.experts.length ? expertList(data.experts, describe)
                           : el("p", { cls: "hint", text: `No ${unitWord()} reaches the minimum count.` }));
}

async function showDocument(nav, doc, pos, group, expert) {
  const query = group === null ? "" : `?group=${group}&expert=${expert}`;
  const data = await api(`/api/document/${doc}/${pos}${query}`);
  const nodes = [el("h2", { id: "doc-title", text: `Document ${data.doc} (${data.label}) around token ${data.pos}` }),
    el("p", { cls: "hint", text: `tokens ${count(data.start)}–${count(data.end - 1)} of ${count(data.length)}; ` +
      `the atlas ran the document in windows of ${data.seq_len} tokens` })];
  let max = 1;
  if (group !== null) {
    $("group").value = String(group);
    $("expert").value = String(expert);
    nodes.push(el("p", { cls: "tools" }, el("span", { text: `${unitWord()} ` }), expertLink(group, expert)));
    max = Math.max(data.max_percent || 0, ...(data.values || []).filter((v) => v !== null), 1e-9);
    nodes.push(legend(max, data.values ? `colour: this ${unitWord()}'s ${valueName()}`
      : `the marked token is the context's; start the viewer with --run to colour every token by this ${unitWord()}`));
  }
  const text = tokenSpans(data.pieces, data.values, data.target, max, { cls: "document", lines: true, targetValue: null });
  text.id = "document";
  nodes.push(text);
  if (show(nav, ...nodes)) {
    const hit = document.querySelector("#document .hit");
    if (hit) hit.scrollIntoView({ block: "center" });
  }
}

async function showText(nav, text) {
  // Which experts fire on each token of the user's text (as `monet atlas query --text`), top 3 per group.
  const box = el("textarea", { id: "text-input", rows: "4", maxlength: String(INFO.limits.text_chars),
                               placeholder: `Type or paste text: each token is listed with its top ${unitWord(true)} per ${INFO.group_word}` });
  box.value = text;
  const go = el("button", { type: "button", id: "text-run", text: `show ${unitWord(true)} per token` });
  go.addEventListener("click", () => { location.hash = `#/text/${encodeURIComponent(box.value)}`; });
  const nodes = [el("h2", { text: `${capital(unitWord(true))} per token` }), box, el("div", { cls: "row" }, go)];
  if (!INFO.has_model) {
    nodes.push(el("p", { cls: "hint", id: "needs-model", text: "Start the viewer with the model, " +
      "`monet view ATLAS --run RUN`, to run your text through it." }));
    go.disabled = true;
    show(nav, ...nodes);
    return;
  }
  if (!text) { show(nav, ...nodes); return; }
  const data = await api(`/api/text?q=${encodeURIComponent(text)}`);
  const table = el("table", { cls: "per-token", id: "text-table" });
  table.appendChild(el("tr", {}, el("th", { text: "token" }), ...data.groups.map((g) => el("th", { text: `${INFO.group_word} ${g}` }))));
  for (const row of data.tokens) {
    const cells = row.groups.map((experts, g) => {
      const cell = el("td");
      experts.forEach((e, i) => {
        if (i) cell.appendChild(document.createTextNode(" · "));
        cell.appendChild(expertLink(data.groups[g], e.expert, `${e.expert}`));
        cell.appendChild(el("span", { cls: "hint", text: ` ${pct(e.percent)}` }));
      });
      return cell;
    });
    table.appendChild(el("tr", {}, el("td", { cls: "piece", text: visible(row.piece) }), ...cells));
  }
  nodes.push(el("p", { cls: "hint", text: INFO.coactive
    ? "Per token and routing group: the experts with the largest share of the token's routing (click one for its page)."
    : `Per token and ${INFO.group_word}: the ${unitWord(true)} with the largest activation (click one for its page).` }), table);
  show(nav, ...nodes);
}

function home(nav) {
  show(nav, el("p", { cls: "hint", text: `Pick a ${unitWord()}, press “random interesting ${unitWord()}” (a label ` +
    `specialist), search a token, or see which ${unitWord(true)} fire on each token of your own text.` }));
}

const ID = /^[0-9]{1,9}$/;

function number(text, what) {
  if (!ID.test(text)) throw new Error(`“${visible(text)}” is not a valid ${what} (a whole number such as 12)`);
  return Number(text);
}

async function route() {
  const nav = ++NAV;
  // A page that takes more than a moment says so (the model may be busy with another request).
  clearTimeout(LOADING);
  LOADING = setTimeout(() => {
    if (nav === NAV) $("content").replaceChildren(el("p", { cls: "hint loading", id: "loading", text: "loading…" }));
  }, 150);
  try {
    let parts;
    try {
      parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
    } catch (error) {
      throw new Error(`This address is malformed (${error.message}): ${visible(location.hash)}. ` +
                      `${capital(unitWord())} pages look like #/expert/0/123.`);
    }
    const [page, ...rest] = parts;
    if (page === "" && rest.length === 0) home(nav);
    else if (page === "expert" && rest.length === 2) await showExpert(nav, number(rest[0], INFO.group_word), number(rest[1], `${unitWord()} id`));
    else if (page === "token" && rest.length >= 1) await showToken(nav, rest.join("/"), "exact");
    else if (page === "contains" && rest.length >= 1) await showToken(nav, rest.join("/"), "substring");
    else if (page === "text") await showText(nav, rest.join("/"));
    else if (page === "label" && (rest.length === 1 || rest.length === 2)) {
      await showLabel(nav, rest[0], rest.length === 2 ? number(rest[1], "minimum count") : 10);
    } else if (page === "doc" && (rest.length === 2 || rest.length === 4)) {
      await showDocument(nav, number(rest[0], "document"), number(rest[1], "position"),
                         rest.length === 4 ? number(rest[2], INFO.group_word) : null,
                         rest.length === 4 ? number(rest[3], `${unitWord()} id`) : null);
    } else {
      throw new Error(`There is no page “${visible(location.hash)}”. Pages: #/expert/G/ID, #/token/TEXT, ` +
                      "#/contains/TEXT, #/label/NAME[/MIN], #/doc/DOC/POS[/G/ID], #/text/TEXT.");
    }
  } catch (error) { fail(nav, error); }
}

async function start() {
  try {
    INFO = await api("/api/info");
  } catch (error) { fail(NAV, error); return; }
  $("summary").textContent = safe(`${INFO.kind} model · ${INFO.groups.length} ${INFO.group_word}s × ` +
    `${count(INFO.experts)} ${INFO.unit_word}s · ` +
    `${count(INFO.tokens)} tokens · labels: ${INFO.labels.join(", ")}` + (INFO.has_model ? " · model loaded" : ""));
  for (const word of document.querySelectorAll(".group-word")) word.textContent = INFO.group_word;
  for (const word of document.querySelectorAll(".unit-word")) word.textContent = unitWord();
  $("home").textContent = `Monet ${unitWord()} atlas`;
  for (const g of INFO.groups) $("group").appendChild(el("option", { value: String(g), text: String(g) }));
  for (const l of INFO.labels) $("label").appendChild(el("option", { value: l, text: l }));
  $("expert").max = String(INFO.experts - 1);
  $("picker").addEventListener("submit", (event) => {
    event.preventDefault();
    location.hash = `#/expert/${$("group").value}/${$("expert").value}`;
  });
  $("random").addEventListener("click", async () => {
    const nav = NAV;
    try {
      const pick = await api(`/api/random?group=${$("group").value}`);
      if (nav === NAV) location.hash = `#/expert/${pick.group}/${pick.expert}`;
    } catch (error) { fail(nav, error); }
  });
  $("search").addEventListener("submit", (event) => {
    event.preventDefault();
    const page = $("match").value === "substring" ? "contains" : "token";
    if ($("token").value) location.hash = `#/${page}/${encodeURIComponent($("token").value)}`;
  });
  $("specialists").addEventListener("submit", (event) => {
    event.preventDefault();
    const min = ID.test($("min-count").value) ? $("min-count").value : "10";
    location.hash = `#/label/${encodeURIComponent($("label").value)}/${min}`;
  });
  window.addEventListener("hashchange", route);
  await route();
}

start();
