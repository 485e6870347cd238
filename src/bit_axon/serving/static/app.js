// bit-axon serve: the chat page and the training-runs dashboard. Plain JS, no libraries, and
// nothing fetched from any other host. URLs are relative so the page also works behind a prefix.
"use strict";

const POLL_MS = 2000;          // how often the dashboard asks for a run's new metrics lines
const ETA_WINDOW = 20;         // the ETA uses the mean step_time of this many latest steps

const $ = (id) => document.getElementById(id);

// --- status line (errors), one message per source so one cannot clear another's -------------

const statusBySource = new Map();
const STATUS_VIEW = { models: "chat", chat: "chat", runs: "runs" };  // where each source's errors show

function setStatus(source, message) {
  if (message) statusBySource.set(source, message);
  else statusBySource.delete(source);
  renderStatus();
}

function renderStatus() {
  const view = $("runs-view").hidden ? "chat" : "runs";
  const text = [...statusBySource].filter(([source]) => STATUS_VIEW[source] === view).map(([, m]) => m).join("\n");
  const el = $("status");
  el.textContent = text;
  el.hidden = !text;
}

async function errorMessage(response) {
  // The server's errors are {"error": {"message": ...}}; anything else is shown as it came.
  const text = await response.text().catch(() => "");
  try {
    const body = JSON.parse(text);
    if (body && body.error && body.error.message) return body.error.message;
  } catch (_) { /* not JSON */ }
  return `${response.status} ${response.statusText}${text ? ": " + text.slice(0, 300) : ""}`;
}

function describe(error) {
  if (error instanceof TypeError) return `Cannot reach the server (${error.message}).`;
  return error && error.message ? error.message : String(error);
}

// --- tabs ------------------------------------------------------------------------------------

function showView(name) {
  for (const tab of document.querySelectorAll(".tab")) {
    const active = tab.dataset.view === name;
    tab.setAttribute("aria-selected", String(active));
    $(tab.dataset.view + "-view").hidden = !active;
  }
  if (location.hash !== "#" + name) history.replaceState(null, "", "#" + name);
  renderStatus();
  if (name === "runs") { dashboard.poll(); dashboard.redraw(); }
  else $("chat-input").focus();
}

// --- chat ------------------------------------------------------------------------------------

const chat = {
  messages: [],       // the conversation sent as `messages`: only turns that completed
  controller: null,   // the AbortController of the reply being streamed, or null

  headers() {
    const headers = { "Content-Type": "application/json" };
    const key = $("api-key").value.trim();
    if (key) headers.Authorization = "Bearer " + key;
    return headers;
  },

  async loadModels() {
    const select = $("model-select");
    const previous = select.value || localStorage.getItem("bit-axon.model");
    try {
      const response = await fetch("v1/models", { headers: this.headers() });
      if (!response.ok) {
        let message = await errorMessage(response);
        if (response.status === 401) message += " (enter the key under API key)";
        throw new Error(message);
      }
      const ids = (await response.json()).data.map((m) => m.id);
      select.replaceChildren(...ids.map((id) => new Option(id, id)));
      if (ids.includes(previous)) select.value = previous;
      setStatus("models", ids.length ? null : "The server serves no models.");
    } catch (error) {
      setStatus("models", "Could not list the models: " + describe(error));
    }
  },

  add(role, text) {
    const el = document.createElement("div");
    el.className = "message " + role;
    el.textContent = text;
    const box = $("messages");
    box.append(el);
    box.scrollTop = box.scrollHeight;
    return el;
  },

  setBusy(busy) {
    $("send").disabled = busy;
    $("stop").disabled = !busy;
  },

  numberField(id) {
    const text = $(id).value.trim();
    return text === "" ? undefined : Number(text);
  },

  async send() {
    const input = $("chat-input");
    const text = input.value;
    if (!text.trim() || this.controller) return;
    const model = $("model-select").value;
    if (!model) { setStatus("chat", "No model to send to: the model list is empty."); return; }
    setStatus("chat", null);
    const user = { role: "user", content: text };
    const body = {
      model,
      messages: [...this.messages, user],
      temperature: this.numberField("temperature"),
      max_tokens: this.numberField("max-tokens"),
      stream: true,
    };
    this.messages.push(user);
    const userEl = this.add("user", text);
    input.value = "";
    const el = this.add("assistant", "");
    el.classList.add("pending");
    const controller = new AbortController();
    this.controller = controller;
    this.setBusy(true);
    let reply = "";
    let finish = null;
    const box = $("messages");
    try {
      const response = await fetch("v1/chat/completions", {
        method: "POST", headers: this.headers(), body: JSON.stringify(body), signal: controller.signal,
      });
      if (!response.ok) throw new Error(await errorMessage(response));
      await readEvents(response, (payload) => {
        const choice = payload.choices && payload.choices[0];
        if (!choice) return;  // e.g. a usage chunk
        const content = choice.delta && choice.delta.content;
        if (content) {
          const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
          reply += content;
          el.textContent = reply;
          if (atBottom) box.scrollTop = box.scrollHeight;
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      });
      if (!finish) throw new Error("The reply stream ended before the reply finished.");
      this.messages.push({ role: "assistant", content: reply });
      if (finish === "length") el.dataset.note = "stopped at the max tokens limit";
      if (!reply) el.dataset.note = "(empty reply)";
    } catch (error) {
      if (this.controller !== controller) {
        // "New chat" while this reply streamed: the conversation it belonged to is gone.
      } else if (error.name === "AbortError") {
        if (reply) {
          this.messages.push({ role: "assistant", content: reply });
          el.dataset.note = "stopped";
        } else {
          this.drop(user, userEl, el);
        }
      } else {
        const message = describe(error);
        this.drop(user, userEl, el, reply);
        this.add("error", message);
        setStatus("chat", message);
      }
    } finally {
      el.classList.remove("pending");
      if (this.controller === controller) {
        this.controller = null;
        this.setBusy(false);
      }
    }
  },

  // A turn that failed leaves the conversation: its user message goes back into the input box.
  drop(user, userEl, assistantEl, partial = "") {
    const i = this.messages.lastIndexOf(user);
    if (i >= 0) this.messages.splice(i, 1);
    userEl.classList.add("dropped");
    userEl.dataset.note = "not part of the conversation";
    if (partial) assistantEl.classList.add("dropped");
    else assistantEl.remove();
    const input = $("chat-input");
    if (!input.value) input.value = user.content;
  },

  stop() {
    if (this.controller) this.controller.abort();
  },

  clear() {
    const controller = this.controller;
    this.controller = null;
    this.setBusy(false);
    if (controller) controller.abort();
    this.messages = [];
    $("messages").replaceChildren();
    setStatus("chat", null);
    $("chat-input").focus();
  },
};

// Reads a server-sent-events body, calling onData with each `data:` JSON payload until [DONE].
// An {"error": ...} payload throws its message.
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  const separator = /\r?\n\r?\n/;
  let buffer = "";
  const handle = (block) => {
    const data = block.split(/\r?\n/)
      .filter((line) => line.startsWith("data:"))
      .map((line) => line.slice(5).replace(/^ /, ""))
      .join("\n");
    if (!data) return false;
    if (data.trim() === "[DONE]") return true;
    const payload = JSON.parse(data);
    if (payload.error) throw new Error(payload.error.message || JSON.stringify(payload.error));
    onData(payload);
    return false;
  };
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let match;
      while ((match = separator.exec(buffer))) {
        const block = buffer.slice(0, match.index);
        buffer = buffer.slice(match.index + match[0].length);
        if (handle(block)) return;
      }
    }
    buffer += decoder.decode();
    if (buffer.trim()) handle(buffer);
  } finally {
    reader.cancel().catch(() => {});
  }
}

// --- charts ----------------------------------------------------------------------------------

function css(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

function niceStep(span, count) {
  const raw = span / Math.max(count, 1);
  const power = Math.pow(10, Math.floor(Math.log10(raw)));
  const f = raw / power;
  return (f < 1.5 ? 1 : f < 3 ? 2 : f < 7 ? 5 : 10) * power;
}

function linearTicks(lo, hi, count, integer = false) {
  let step = niceStep(hi - lo, count);
  if (integer) step = Math.max(1, Math.round(step));
  const ticks = [];
  for (let v = Math.ceil(lo / step - 1e-9) * step; v <= hi + step * 1e-9; v += step) {
    ticks.push(Math.abs(v) < step * 1e-9 ? 0 : v);
  }
  return ticks;
}

// Ticks for a log axis over [lo, hi] (values, not logs): 1-2-5 per decade, thinned to a few.
function logTicks(lo, hi) {
  const ticks = [];
  for (let e = Math.floor(Math.log10(lo)); e <= Math.ceil(Math.log10(hi)); e++) {
    for (const m of [1, 2, 5]) {
      const v = m * Math.pow(10, e);
      if (v >= lo * (1 - 1e-9) && v <= hi * (1 + 1e-9)) ticks.push(v);
    }
  }
  if (ticks.length > 7) return ticks.filter((v) => Math.abs(Math.log10(v) - Math.round(Math.log10(v))) < 1e-9);
  if (ticks.length >= 3) return ticks;
  return linearTicks(lo, hi, 4).filter((v) => v > 0);  // a narrow range: plain ticks, log-placed
}

function formatNumber(v) {
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1e5 || a < 1e-3) return v.toExponential(1).replace(".0e", "e").replace("e+", "e");
  return String(Number(v.toPrecision(3)));
}

// Draws series [{label, color, points: [[x, y]], axis: "left"|"right", dots}] on a canvas.
// Returns how many points were drawn for each series, by label.
function drawChart(canvas, { series, log = false, yLabel = "", y2Label = "", xLabel = "step" }) {
  const dpr = window.devicePixelRatio || 1;
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  const counts = {};
  if (!width || !height) return null;  // hidden: draw when shown
  canvas.width = Math.round(width * dpr);
  canvas.height = Math.round(height * dpr);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const fg = css("--fg"), muted = css("--muted"), grid = css("--grid");
  ctx.font = "11px system-ui, sans-serif";

  const shown = series.map((s) => ({
    ...s, points: s.points.filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y) && (!log || y > 0)),
  }));
  for (const s of shown) counts[s.label] = s.points.length;
  const all = shown.flatMap((s) => s.points);
  if (!all.length) {
    ctx.fillStyle = muted;
    ctx.textAlign = "center";
    ctx.textBaseline = "middle";
    ctx.fillText("No data yet", width / 2, height / 2);
    return counts;
  }
  const hasRight = shown.some((s) => s.axis === "right" && s.points.length);
  const pad = { left: 58, right: hasRight ? 58 : 16, top: 24, bottom: 34 };
  const plotW = width - pad.left - pad.right;
  const plotH = height - pad.top - pad.bottom;

  let xMin = Math.min(...all.map((p) => p[0])), xMax = Math.max(...all.map((p) => p[0]));
  if (xMin === xMax) { xMin -= 1; xMax += 1; }
  const sx = (x) => pad.left + ((x - xMin) / (xMax - xMin)) * plotW;

  const axis = (side) => {
    const values = shown.filter((s) => (s.axis || "left") === side).flatMap((s) => s.points.map((p) => p[1]));
    if (!values.length) return null;
    let lo = Math.min(...values), hi = Math.max(...values);
    if (log) {
      if (lo === hi) { lo /= 1.5; hi *= 1.5; }
      const span = Math.log10(hi) - Math.log10(lo);
      lo /= Math.pow(10, span * 0.06); hi *= Math.pow(10, span * 0.06);
      const t = (v) => Math.log10(v);
      return { lo, hi, ticks: logTicks(lo, hi), y: (v) => pad.top + plotH - ((t(v) - t(lo)) / (t(hi) - t(lo))) * plotH };
    }
    if (lo === hi) { const d = Math.abs(lo) * 0.1 || 1; lo -= d; hi += d; }
    const margin = (hi - lo) * 0.06;
    if (lo >= 0 && lo - margin < 0) lo = 0; else lo -= margin;
    hi += margin;
    return { lo, hi, ticks: linearTicks(lo, hi, 4), y: (v) => pad.top + plotH - ((v - lo) / (hi - lo)) * plotH };
  };
  const left = axis("left"), right = axis("right");

  // grid and y ticks
  ctx.lineWidth = 1;
  ctx.textBaseline = "middle";
  const yTicks = (ax, side) => {
    if (!ax) return;
    ctx.textAlign = side === "left" ? "right" : "left";
    for (const v of ax.ticks) {
      const y = Math.round(ax.y(v)) + 0.5;
      if (y < pad.top - 1 || y > pad.top + plotH + 1) continue;
      if (side === "left" || !left) {
        ctx.strokeStyle = grid;
        ctx.beginPath(); ctx.moveTo(pad.left, y); ctx.lineTo(pad.left + plotW, y); ctx.stroke();
      }
      ctx.fillStyle = muted;
      ctx.fillText(formatNumber(v), side === "left" ? pad.left - 6 : pad.left + plotW + 6, y);
    }
  };
  yTicks(left, "left");
  yTicks(right, "right");

  // x ticks
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  for (const v of linearTicks(xMin, xMax, Math.max(2, Math.floor(plotW / 80)), true)) {
    const x = Math.round(sx(v)) + 0.5;
    ctx.strokeStyle = grid;
    ctx.beginPath(); ctx.moveTo(x, pad.top); ctx.lineTo(x, pad.top + plotH); ctx.stroke();
    ctx.fillStyle = muted;
    ctx.fillText(formatNumber(v), x, pad.top + plotH + 5);
  }
  ctx.strokeStyle = muted;
  ctx.strokeRect(pad.left + 0.5, pad.top + 0.5, plotW, plotH);

  // axis labels
  ctx.fillStyle = muted;
  ctx.textAlign = "right";
  ctx.textBaseline = "bottom";
  ctx.fillText(xLabel, pad.left + plotW, height - 2);
  const vertical = (text, x) => {
    ctx.save();
    ctx.translate(x, pad.top + plotH / 2);
    ctx.rotate(-Math.PI / 2);
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    ctx.fillText(text, 0, 0);
    ctx.restore();
  };
  if (left && yLabel) vertical(yLabel, 2);
  if (right && y2Label) { ctx.save(); vertical(y2Label, width - 14); ctx.restore(); }

  // series
  ctx.save();
  ctx.beginPath();
  ctx.rect(pad.left, pad.top - 4, plotW, plotH + 8);
  ctx.clip();
  for (const s of shown) {
    const ax = (s.axis || "left") === "right" ? right : left;
    if (!ax || !s.points.length) continue;
    ctx.strokeStyle = ctx.fillStyle = s.color;
    ctx.lineWidth = 1.8;
    ctx.lineJoin = "round";
    ctx.beginPath();
    s.points.forEach(([x, y], i) => (i ? ctx.lineTo(sx(x), ax.y(y)) : ctx.moveTo(sx(x), ax.y(y))));
    ctx.stroke();
    if (s.dots || s.points.length === 1) {
      for (const [x, y] of s.points) {
        ctx.beginPath(); ctx.arc(sx(x), ax.y(y), 3, 0, 2 * Math.PI); ctx.fill();
      }
    }
  }
  ctx.restore();

  // legend
  let lx = pad.left;
  ctx.textAlign = "left";
  ctx.textBaseline = "middle";
  for (const s of shown) {
    if (!s.points.length) continue;
    ctx.fillStyle = s.color;
    ctx.fillRect(lx, 9, 14, 3);
    ctx.fillStyle = fg;
    const last = s.points[s.points.length - 1][1];
    const text = `${s.label} ${formatNumber(last)}`;
    ctx.fillText(text, lx + 19, 11);
    lx += 19 + ctx.measureText(text).width + 16;
  }
  return counts;
}

// --- dashboard -------------------------------------------------------------------------------

function formatDuration(seconds) {
  if (!Number.isFinite(seconds)) return "–";
  seconds = Math.max(0, Math.round(seconds));
  const h = Math.floor(seconds / 3600), m = Math.floor((seconds % 3600) / 60), s = seconds % 60;
  if (h) return `${h}h ${String(m).padStart(2, "0")}m`;
  if (m) return `${m}m ${String(s).padStart(2, "0")}s`;
  return `${s}s`;
}

function metricsUrl(name, offset) {
  return `api/metrics?run=${encodeURIComponent(name)}&offset=${offset}`;
}

const dashboard = {
  run: null,          // {name, records, offset, summary}
  generation: 0,      // bumped when the run changes, so a late answer for the old run is dropped
  inFlight: false,
  again: false,
  timer: null,
  runNames: [],

  visible() { return !$("runs-view").hidden; },

  async refreshRuns() {
    const response = await fetch("api/runs");
    if (!response.ok) throw new Error(await errorMessage(response));
    const { root, runs } = await response.json();
    $("run-root").textContent = root ? `watching ${root}` : "";
    const select = $("run-select");
    if (!root) {
      select.replaceChildren(new Option("no runs directory", ""));
      select.disabled = true;
      setStatus("runs", "No runs directory: start the server with --runs DIR to watch training runs.");
      return;
    }
    select.disabled = false;
    if (runs.join("\n") !== this.runNames.join("\n")) {
      const current = this.run ? this.run.name : null;
      this.runNames = runs;
      const names = current && !runs.includes(current) ? [current, ...runs] : runs;
      select.replaceChildren(...(names.length ? names.map((n) => new Option(n, n)) : [new Option("no runs yet", "")]));
      if (current) select.value = current;
    }
    if (!this.run && runs.length) this.select(runs[0]);
  },

  select(name) {
    this.generation += 1;
    this.run = name ? { name, records: [], offset: 0, summary: null } : null;
    $("run-select").value = name || "";
    this.render();
    this.poll();
  },

  async fetchMetrics() {
    const run = this.run;
    const generation = this.generation;
    const response = await fetch(metricsUrl(run.name, run.offset));
    if (!response.ok) throw new Error(`Run ${run.name}: ${await errorMessage(response)}`);
    const data = await response.json();
    if (generation !== this.generation) return;
    if (data.reset) run.records = [];  // metrics.jsonl was rewritten (a run started over in the directory)
    for (const record of data.records) run.records.push(record);
    run.offset = data.offset;
    const fresh = data.records.length > 0 || !run.summary;
    const summaryChanged = JSON.stringify(run.summary) !== JSON.stringify(this.summaryOf(data));
    run.summary = this.summaryOf(data);
    if (fresh || summaryChanged) this.render();
  },

  summaryOf(data) {
    const { checkpoints, settings_file, settings, outputs, max_steps } = data;
    return { checkpoints, settings_file, settings, outputs, max_steps };
  },

  // One poll now (or right after the one running), then every POLL_MS while the tab is shown.
  poll() {
    if (this.inFlight) { this.again = true; return; }
    clearTimeout(this.timer);
    if (!this.visible()) return;
    this.inFlight = true;
    (async () => {
      try {
        await this.refreshRuns();
        if (this.run) await this.fetchMetrics();
        setStatus("runs", null);
      } catch (error) {
        setStatus("runs", describe(error));
      } finally {
        this.inFlight = false;
        this.timer = setTimeout(() => this.poll(), this.again ? 0 : POLL_MS);
        this.again = false;
      }
    })();
  },

  render() {
    const run = this.run;
    const records = run ? run.records : [];
    const summary = (run && run.summary) || {};
    const last = (key) => {
      for (let i = records.length - 1; i >= 0; i--) if (records[i][key] != null) return records[i];
      return null;
    };
    const step = records.length ? records[records.length - 1].step : null;
    const maxSteps = summary.max_steps;
    $("run-step").textContent = step == null ? "–" : maxSteps ? `step ${step} / ${maxSteps}` : `step ${step}`;

    const times = records.filter((r) => Number.isFinite(r.step_time)).slice(-ETA_WINDOW).map((r) => r.step_time);
    let eta = "–";
    if (step != null && maxSteps) {
      if (step >= maxSteps) eta = "done";
      else if (times.length) eta = formatDuration((maxSteps - step) * (times.reduce((a, b) => a + b, 0) / times.length));
    }
    $("run-eta").textContent = eta;
    const value = (key, digits = 4) => {
      const r = last(key);
      return r && Number.isFinite(r[key]) ? formatNumber(Number(r[key].toPrecision(digits))) : "–";
    };
    $("run-loss").textContent = value("loss");
    const val = last("val_loss");
    $("run-val-loss").textContent = val ? `${formatNumber(val.val_loss)} @${val.step}` : "–";
    const tps = last("tokens_per_sec");
    $("run-tps").textContent = tps ? Math.round(tps.tokens_per_sec).toLocaleString() : "–";
    const peaks = records.map((r) => r.peak_memory_gb).filter(Number.isFinite);
    $("run-memory").textContent = peaks.length ? `${Math.max(...peaks).toFixed(2)} GB` : "–";
    $("run-epoch").textContent = value("epoch", 3);
    const pause = last("total_pause_time"), cool = last("total_cooldown_time");
    $("run-pause").textContent = pause || cool
      ? formatDuration((pause ? pause.total_pause_time : 0) + (cool ? cool.total_cooldown_time : 0)) : "–";

    // lists
    const list = (id, items, empty) => {
      $(id).replaceChildren(...(items.length ? items : [empty]).map((text) => {
        const li = document.createElement("li");
        li.textContent = text;
        if (!items.length) li.className = "muted";
        return li;
      }));
    };
    list("checkpoints", (summary.checkpoints || []).map((c) => `${c.name}`), "none yet");
    list("outputs", summary.outputs || [], "none yet");
    $("settings-file").textContent = summary.settings_file || "";
    $("settings").textContent = summary.settings || "No settings file.";

    // samples of the latest evaluation
    const withSamples = last("samples");
    const box = $("samples");
    if (withSamples && Array.isArray(withSamples.samples) && withSamples.samples.length) {
      $("samples-step").textContent = `(step ${withSamples.step})`;
      box.replaceChildren(...withSamples.samples.map((s) => {
        const div = document.createElement("div");
        div.className = "sample";
        for (const [cls, tag, text] of [["prompt", "prompt", s.prompt], ["completion", "model", s.completion]]) {
          const p = document.createElement("div");
          p.className = cls;
          const t = document.createElement("span");
          t.className = "tag";
          t.textContent = tag;
          p.append(t, String(text ?? ""));
          div.append(p);
        }
        return div;
      }));
    } else {
      $("samples-step").textContent = "";
      box.innerHTML = '<p class="muted">None yet: samples appear at evaluation steps.</p>';
    }
    this.redraw();
  },

  redraw() {
    if (!this.visible()) return;
    const records = this.run ? this.run.records : [];
    const pts = (key) => records.filter((r) => r[key] != null).map((r) => [r.step, r[key]]);
    const color = (i) => css(`--c${i}`);
    const series = [
      { label: "loss", color: color(1), points: pts("loss") },
      { label: "val_loss", color: color(2), points: pts("val_loss"), dots: true },
    ];
    for (const [key, i] of [["ce", 3], ["kl", 4], ["val_kl", 4]]) {
      const p = pts(key);
      if (p.length) series.push({ label: key, color: color(i), points: p, dots: key.startsWith("val") });
    }
    const loss = $("loss-chart");
    const counts = drawChart(loss, { series, log: true, yLabel: "loss" });
    if (counts) loss.dataset.points = String(counts.loss);
    const lr = $("lr-chart");
    const lrCounts = drawChart(lr, { series: [{ label: "lr", color: color(3), points: pts("learning_rate") }],
      yLabel: "learning rate" });
    if (lrCounts) lr.dataset.points = String(lrCounts.lr);
    const speed = $("speed-chart");
    const speedCounts = drawChart(speed, {
      series: [{ label: "tokens/s", color: color(1), points: pts("tokens_per_sec") }], yLabel: "tokens/s" });
    if (speedCounts) speed.dataset.points = String(speedCounts["tokens/s"]);
    const thermal = $("thermal-chart");
    const thermalCounts = drawChart(thermal, {
      series: [
        { label: "temperature °C", color: color(2), points: pts("temperature") },
        { label: "paused s", color: color(4), points: pts("total_pause_time"), axis: "right" },
      ],
      yLabel: "°C", y2Label: "seconds paused",
    });
    if (thermalCounts) thermal.dataset.points = String(thermalCounts["temperature °C"] + thermalCounts["paused s"]);
  },
};

// --- wiring ----------------------------------------------------------------------------------

function init() {
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => showView(tab.dataset.view));
  window.addEventListener("hashchange", () => showView(location.hash === "#runs" ? "runs" : "chat"));

  const apiKey = $("api-key");
  apiKey.value = sessionStorage.getItem("bit-axon.api-key") || "";
  apiKey.addEventListener("change", () => {
    sessionStorage.setItem("bit-axon.api-key", apiKey.value.trim());
    chat.loadModels();
  });
  $("model-select").addEventListener("change", (e) => localStorage.setItem("bit-axon.model", e.target.value));
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); chat.send(); });
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); chat.send(); }
  });
  $("stop").addEventListener("click", () => chat.stop());
  $("new-chat").addEventListener("click", () => chat.clear());

  const runSelect = $("run-select");
  runSelect.addEventListener("change", () => dashboard.select(runSelect.value));
  runSelect.addEventListener("focus", () => dashboard.poll());
  let resizeTimer = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => dashboard.redraw(), 100);
  });
  const media = window.matchMedia("(prefers-color-scheme: dark)");
  if (media.addEventListener) media.addEventListener("change", () => dashboard.redraw());

  chat.setBusy(false);
  chat.loadModels();
  showView(location.hash === "#runs" ? "runs" : "chat");
}

init();
