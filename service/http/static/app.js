// The demo page: drawing pads, the support set, and the two /v1 calls (register, classify).
// Plain browser JavaScript, no build step and no dependencies.
"use strict";

const INK = "#111";
const PAPER = "#fff";
const DARK_PAPER = "#000";
const STROKE = 9; // px on a 160 px pad: about Omniglot's stroke width once shrunk to 28 px

const $ = (selector, root = document) => root.querySelector(selector);

// ------------------------------------------------------------------------------ drawing pads

// A canvas to draw on with a mouse, a finger or a pen (pointer events cover all three).
// Exported as a PNG: dark ink on white paper, or light on black for an upload whose strokes white
// would hide; the service detects either polarity.
class Pad {
  constructor(canvas) {
    this.canvas = canvas;
    this.ctx = canvas.getContext("2d");
    this.inked = false;
    this.last = null;
    this.clear();
    canvas.addEventListener("pointerdown", (e) => this.down(e));
    canvas.addEventListener("pointermove", (e) => this.move(e));
    for (const type of ["pointerup", "pointercancel", "pointerleave"]) {
      canvas.addEventListener(type, () => { this.last = null; });
    }
  }

  clear(paper = PAPER) {
    this.ctx.fillStyle = paper;
    this.ctx.fillRect(0, 0, this.canvas.width, this.canvas.height);
    this.ink = paper === PAPER ? INK : PAPER; // drawing over an upload: a pen that shows on its paper
    this.inked = false;
  }

  point(e) {
    const box = this.canvas.getBoundingClientRect();
    return [(e.clientX - box.left) * this.canvas.width / box.width,
            (e.clientY - box.top) * this.canvas.height / box.height];
  }

  down(e) {
    e.preventDefault();
    this.canvas.setPointerCapture?.(e.pointerId);
    this.last = this.point(e);
    this.line(this.last, this.last);
  }

  move(e) {
    if (this.last === null) return;
    e.preventDefault();
    const next = this.point(e);
    this.line(this.last, next);
    this.last = next;
  }

  line([x0, y0], [x1, y1]) {
    const ctx = this.ctx;
    ctx.strokeStyle = this.ink;
    ctx.lineWidth = STROKE;
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(x0, y0);
    ctx.lineTo(x1, y1);
    ctx.stroke();
    this.inked = true;
  }

  // An uploaded image, scaled to fit on white paper (transparent pixels become paper), or on black
  // paper where white hides it all (a white pen on a transparent canvas, as dark themes export).
  drawImage(img) {
    const { width, height } = this.canvas;
    const scale = Math.min(width / img.width, height / img.height);
    const w = img.width * scale, h = img.height * scale;
    for (const paper of [PAPER, DARK_PAPER]) {
      this.clear(paper);
      this.ctx.drawImage(img, (width - w) / 2, (height - h) / 2, w, h);
      if (!this.blank()) break;
    }
    this.inked = true;
  }

  // Whether the pad is one shade throughout.
  blank() {
    const { data } = this.ctx.getImageData(0, 0, this.canvas.width, this.canvas.height);
    for (let i = 4; i < data.length; i += 4) {
      if (data[i] !== data[0] || data[i + 1] !== data[1] || data[i + 2] !== data[2]) return false;
    }
    return true;
  }

  png() {
    return this.canvas.toDataURL("image/png");
  }
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("the browser cannot read this image"));
    img.src = src;
  });
}

// ------------------------------------------------------------------------------------- API

async function api(method, path, body) {
  const headers = { "Content-Type": "application/json" };
  const key = $("#api-key").value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;
  const response = await fetch(path, { method, headers, body: body && JSON.stringify(body) });
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    const message = data?.error?.message ?? `${response.status} ${response.statusText}`;
    throw new Error(message);
  }
  return data;
}

// ----------------------------------------------------------------------------- support set

const classes = []; // {card, pad, examples: [dataURL]}
let registered = null; // {task, support: [{label, image}], key}: the page's one task on the server

function addClass(name) {
  const card = $("#class-template").content.firstElementChild.cloneNode(true);
  const entry = { card, pad: new Pad($("canvas", card)), examples: [] };
  $(".class-name", card).value = name;
  $(".add-example", card).addEventListener("click", () => {
    if (!entry.pad.inked) return;
    addExample(entry, entry.pad.png());
    entry.pad.clear();
  });
  $(".clear", card).addEventListener("click", () => entry.pad.clear());
  $(".upload-input", card).addEventListener("change", async (e) => {
    for (const file of e.target.files) addExample(entry, await readFile(file));
    e.target.value = "";
  });
  $(".remove-class", card).addEventListener("click", () => {
    if (classes.length <= 2) return; // a task needs two classes
    classes.splice(classes.indexOf(entry), 1);
    card.remove();
  });
  classes.push(entry);
  $("#classes").append(card);
  return entry;
}

function addExample(entry, image) {
  const item = document.createElement("li");
  const img = document.createElement("img");
  img.src = image;
  img.alt = "example";
  const remove = document.createElement("button");
  remove.type = "button";
  remove.textContent = "✕";
  remove.title = "remove this example";
  remove.addEventListener("click", () => {
    entry.examples.splice(entry.examples.indexOf(image), 1);
    item.remove();
  });
  item.append(img, remove);
  $(".examples", entry.card).append(item);
  entry.examples.push(image);
}

// Every kept example, plus what is on each pad now (so "draw, then register" works for one shot).
function supportSet() {
  const support = [];
  for (const entry of classes) {
    const label = $(".class-name", entry.card).value.trim();
    const images = [...entry.examples, ...(entry.pad.inked ? [entry.pad.png()] : [])];
    for (const image of images) support.push({ label, image });
  }
  return support;
}

async function register() {
  const status = $("#task");
  const support = supportSet();
  const names = classes.map((entry) => $(".class-name", entry.card).value.trim());
  if (names.some((n) => !n)) return say(status, "Name every class.", true);
  if (new Set(names).size !== names.length) return say(status, "Give each class its own name.", true);
  const empty = classes.filter((entry) => !entry.examples.length && !entry.pad.inked);
  if (empty.length) return say(status, "Draw or upload at least one example for every class.", true);
  // The same support set again: the task registered for it serves as it is.
  const key = JSON.stringify(support);
  if (registered?.key === key) {
    return say(status, `Task ${registered.task.task_id} already holds this support set: ${describe(registered.task)}.`);
  }
  say(status, "Registering…");
  try {
    const task = await api("POST", "/v1/tasks", { name: "demo", examples: support });
    const replaced = registered;
    registered = { task, support, key };
    say(status, `Registered task ${task.task_id}: ${describe(task)}.`);
    status.dataset.taskId = task.task_id;
    showWarnings(task.warnings ?? []);
    $("#classify").disabled = false;
    // The page keeps one task on the server: the one this support set replaced goes.
    if (replaced) api("DELETE", `/v1/tasks/${replaced.task.task_id}`).catch(() => {});
  } catch (error) {
    showWarnings([]);
    say(status, `Could not register: ${error.message}`, true);
  }
}

function describe(task) {
  const shots = Object.entries(task.shots).map(([label, n]) => `${label}: ${n}`).join(", ");
  return `${task.n_way}-way (${shots})`;
}

// What the model found wrong with the support set: the task is registered all the same.
function showWarnings(warnings) {
  const list = $("#warnings");
  list.replaceChildren(...warnings.map((warning) => {
    const item = document.createElement("li");
    item.className = "warning";
    item.dataset.type = warning.type;
    const indices = warning.details.example_indices ?? [warning.details.example_index];
    for (const i of indices) {
      const example = registered?.support[i];
      if (!example) continue;
      const img = document.createElement("img");
      img.src = example.image;
      img.alt = `example ${i} of ${example.label}`;
      item.append(img);
    }
    item.append(text("span", "message", warning.message));
    return item;
  }));
  list.hidden = warnings.length === 0;
}

// ---------------------------------------------------------------------------------- query

async function classify(queryPad) {
  const status = $("#query-status");
  if (!registered) return say(status, "Register a task first.", true);
  if (!queryPad.inked) return say(status, "Draw or upload a query first.", true);
  say(status, "Classifying…");
  say($("#similarity"), "");
  try {
    const topK = Math.max(1, Number($("#top-k").value) || 1);
    const minConfidence = Math.min(1, Math.max(0, Number($("#min-confidence").value) || 0));
    const body = { images: [queryPad.png()], top_k: topK, explain: true, min_confidence: minConfidence };
    const result = await api("POST", `/v1/tasks/${registered.task.task_id}/classify`, body);
    const prediction = result.predictions[0];
    showPredictions(prediction);
    showAttention(prediction);
    say($("#similarity"), `Similarity to the support set: ${prediction.support_similarity.toFixed(2)} ` +
        "(1 for one of its examples; low for a drawing unlike all of them).");
    if (prediction.label === null) {
      const best = prediction.top_k[0];
      say(status, `None of these: the best, “${best.label}”, has ${percent(best.probability)}, ` +
          `below the minimum confidence of ${percent(minConfidence)}.`);
    } else {
      say(status, `Looks like “${prediction.label}” (${percent(prediction.confidence)}).`);
    }
  } catch (error) {
    say(status, `Could not classify: ${error.message}`, true);
  }
}

function showPredictions(prediction) {
  const list = $("#predictions");
  list.replaceChildren(...prediction.top_k.map(({ label, probability }) => {
    const item = document.createElement("li");
    item.className = "prediction";
    item.append(text("span", "label", label), bar(probability), text("span", "value", percent(probability)));
    return item;
  }));
  $("#results").hidden = false;
}

function showAttention(prediction) {
  const top = Math.max(...prediction.attention.map((a) => a.weight));
  $("#attention").replaceChildren(...prediction.attention.map(({ example_index, label, weight }) => {
    const item = document.createElement("li");
    item.className = "support" + (label === prediction.label ? " predicted" : "");
    const img = document.createElement("img");
    img.src = registered.support[example_index].image;
    img.alt = `example ${example_index} of ${label}`;
    img.style.opacity = String(0.25 + 0.75 * (top > 0 ? weight / top : 0));
    item.append(img, text("span", "label", label), bar(top > 0 ? weight / top : 0),
                text("span", "value", weight.toFixed(3)));
    return item;
  }));
}

// ------------------------------------------------------------------------------- helpers

function text(tag, className, content) {
  const el = document.createElement(tag);
  el.className = className;
  el.textContent = content;
  return el;
}

function bar(fraction) {
  const outer = document.createElement("span");
  outer.className = "bar";
  const inner = document.createElement("span");
  inner.style.width = `${Math.round(100 * Math.min(1, Math.max(0, fraction)))}%`;
  outer.append(inner);
  return outer;
}

function percent(p) {
  return `${(100 * p).toFixed(1)}%`;
}

function say(el, message, isError = false) {
  el.textContent = message;
  el.classList.toggle("error", isError);
}

async function showModel() {
  const line = $("#model");
  for (;;) {
    const response = await fetch("/readyz").catch(() => null);
    if (response?.ok) break;
    say(line, "The model is loading…");
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
  try {
    const model = await api("GET", "/v1/model");
    say(line, `Model ${model.name} ${model.version} on ${model.device}: up to ${model.max_way} classes.`);
  } catch (error) {
    say(line, `Ready. (${error.message})`); // e.g. the API key is not set yet
  }
  document.body.dataset.ready = "true";
}

function main() {
  addClass("A");
  addClass("B");
  $("#add-class").addEventListener("click", () => addClass(String.fromCharCode(65 + classes.length)));
  $("#register").addEventListener("click", register);
  const queryPad = new Pad($("#query-canvas"));
  $("#query-clear").addEventListener("click", () => queryPad.clear());
  $("#query-upload").addEventListener("change", async (e) => {
    const [file] = e.target.files;
    if (file) queryPad.drawImage(await loadImage(await readFile(file)));
    e.target.value = "";
  });
  $("#classify").addEventListener("click", () => classify(queryPad));
  showModel();
}

main();
