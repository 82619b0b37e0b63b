// The im2latex page: take an image (file, drop, paste), send it to /api/predict, show the answer.
// Plain JavaScript with no dependencies, so the page works without any network access.
"use strict";

const $ = (id) => document.getElementById(id);
const limits = { maxUploadMb: 10, maxBeam: 10, beam: 5 };
let current = null;  // the image being shown: re-decoded when the beam size changes
let requestId = 0;   // answers to older requests are dropped

function setStatus(text, kind = "") {
  const el = $("status");
  el.textContent = text;
  el.className = kind;
}

function fillBeamChoices() {
  const select = $("beam");
  select.replaceChildren();
  for (let k = 1; k <= limits.maxBeam; k++) {
    const option = new Option(k === 1 ? "1 (greedy)" : String(k), String(k));
    option.selected = k === limits.beam;
    select.add(option);
  }
}

async function loadHealth() {
  try {
    const r = await fetch("/api/health");
    if (!r.ok) return;
    const h = await r.json();
    limits.maxUploadMb = h.max_upload_mb;
    limits.maxBeam = h.max_beam_size;
    limits.beam = h.beam_size;
    $("model-info").textContent = `Model: ${h.model.name} (${h.model.vocab_size} tokens).`;
    $("limits").textContent =
      `PNG, JPEG, GIF, BMP, TIFF or WebP, up to ${h.max_upload_mb} MB.`;
  } finally {
    fillBeamChoices();
  }
}

function show(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) {
    setStatus(`That is not an image (${file.type}).`, "error");
    return;
  }
  if (file.size > limits.maxUploadMb * 1024 * 1024) {
    setStatus(`The image is larger than ${limits.maxUploadMb} MB.`, "error");
    return;
  }
  const preview = $("preview");
  if (preview.src.startsWith("blob:")) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  current = file;
  decode();
}

function clearAnswer() {
  $("latex").value = "";
  $("confidence").textContent = "–";
  $("time").textContent = "–";
  $("render").hidden = true;
  $("render").removeAttribute("src");
  $("render-failed").hidden = true;
}

async function decode() {
  const id = ++requestId;
  const form = new FormData();
  form.append("image", current, current.name || "pasted.png");
  form.append("beam_size", $("beam").value);
  $("result").hidden = false;
  clearAnswer();
  setStatus("Reading the formula…", "busy");
  const started = performance.now();
  let answer;
  try {
    const r = await fetch("/api/predict", { method: "POST", body: form });
    answer = await r.json().catch(() => ({ detail: `${r.status} ${r.statusText}` }));
    if (!r.ok) throw new Error(describe(answer.detail, r.status));
  } catch (err) {
    if (id === requestId) setStatus(`Could not read this image: ${err.message}`, "error");
    return;
  }
  if (id !== requestId) return;
  const total = Math.round(performance.now() - started);
  $("latex").value = answer.latex;
  showConfidence(answer);
  $("time").textContent = `${Math.round(answer.ms)} ms`;
  $("time").title = `${total} ms including the upload`;
  if (answer.render_png) {
    $("render").src = `data:image/png;base64,${answer.render_png}`;
    $("render").hidden = false;
  } else {
    $("render-failed").hidden = false;
  }
  setStatus(answer.latex ? "Done." : "Done, but the model wrote nothing.");
}

// The server's `confidence` is the measured chance that a reading is exactly right (calibrated
// on validation images for the model it runs, im2latex/confidence.py); without one (a model
// nobody calibrated) the page shows exp(score), which ranks readings but is no such chance.
function showConfidence(answer) {
  const el = $("confidence");
  const score = `mean token log-probability ${answer.score.toFixed(3)}`;
  if (typeof answer.confidence === "number") {
    el.textContent = `${(100 * answer.confidence).toFixed(0)} %`;
    el.title = "Chance that this reading is exactly right, measured on validation images " +
      `(${score}).`;
  } else {
    el.textContent = `${(100 * Math.exp(answer.score)).toFixed(1)} %`;
    el.title = `Not calibrated for this model: exp(${score}), not a chance of being right.`;
  }
}

function describe(detail, status) {
  if (Array.isArray(detail)) {  // FastAPI validation errors
    return detail.map((d) => `${d.loc.at(-1)}: ${d.msg}`).join("; ");
  }
  return detail || `HTTP ${status}`;
}

async function copyLatex() {
  const text = $("latex").value;
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    $("latex").select();  // pages served over plain http get no clipboard API
    document.execCommand("copy");
  }
  $("copy").textContent = "Copied";
  setTimeout(() => { $("copy").textContent = "Copy"; }, 1500);
}

function wireInputs() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => show(e.target.files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    show(e.dataTransfer.files[0]);
  });
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("file").click(); }
  });
  document.addEventListener("paste", (e) => {
    const item = [...e.clipboardData.items].find((i) => i.type.startsWith("image/"));
    if (item) { e.preventDefault(); show(item.getAsFile()); }
  });
  $("beam").addEventListener("change", () => { if (current) decode(); });
  $("copy").addEventListener("click", copyLatex);
}

wireInputs();
loadHealth();
