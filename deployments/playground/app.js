// The playground: a client of the public job API (README, "Serving") and nothing else. Every URL is relative to the
// page, so that it works wherever the app is mounted. <img> and <video> cannot send a bearer token, so media is
// fetched with it and shown from blob: URLs.
"use strict";

const PAGE_SIZE = Number(new URLSearchParams(location.search).get("limit")) || 8;  // jobs a page: ?limit=N
const TOKEN_KEY = "srd-token";
const $ = (id) => document.getElementById(id);
const fieldInputs = () => [...$("fields").querySelectorAll("input, select")];

// The API's error object ({message, param, code}) with the HTTP status.
class ApiError extends Error {
  constructor(status, error) {
    super(error.message);
    this.status = status;
    this.param = error.param;
    this.code = error.code;
  }
}

async function api(path, options = {}) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const headers = {...options.headers, ...(token ? {Authorization: `Bearer ${token}`} : {})};
  const response = await fetch(path, {...options, headers});
  if (!response.ok) {
    let error;
    try {
      error = (await response.json()).error;
    } catch {  // Serve's proxy sheds load with plain text
      error = {message: `${response.status} ${response.statusText}`, param: null, code: String(response.status)};
    }
    throw new ApiError(response.status, error);
  }
  return response;
}

function showError(error) {
  for (const input of document.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
  const box = $("error");
  box.hidden = !error;
  if (!error) return;
  if (!(error instanceof ApiError)) {
    box.textContent = String(error);
    return;
  }
  box.replaceChildren(`${error.status} ${error.code}: ${error.message}`);
  if (error.param) {
    const field = document.createElement("strong");
    field.className = "param";
    field.textContent = error.param;
    box.append(" (field ", field, ")");
    document.querySelector(`#request [name="${CSS.escape(error.param)}"]`)?.setAttribute("aria-invalid", "true");
  }
}

// Runs an action, showing the API's error instead of throwing.
const guarded = (action) => async (...args) => {
  try {
    await action(...args);
  } catch (error) {
    if (error.name !== "AbortError") showError(error);
  }
};

// -- the model: defaults, schedules and prompt grammar --------------------------------------------------------------

async function loadModel() {
  const model = (await (await api("v1/models")).json()).data[0];
  $("model").textContent = `${model.id} (preset ${model.preset}, speed profile ${model.speed}, at most ` +
    `${model.limits.max_steps} steps and ${model.limits.max_tokens_per_video} tokens per video)`;
  for (const input of fieldInputs()) {
    const value = model.defaults[input.name];
    if (value !== undefined && value !== null) input.value = value;
  }
  // The default, then a quality target per calibrated schedule (rounded down, so that it picks that schedule).
  $("switches").replaceChildren(new Option("the server's default", model.defaults.switch),
    ...model.schedules.map((s) => new Option(`${s.switch}: ${s.cost.toFixed(2)} large-model steps per step`,
      `quality:${Math.floor(s.quality * 100) / 100}`)));
  showGrammar(model.prompt_grammar);
}

function showGrammar(grammar) {
  $("grammar").hidden = !grammar;
  if (!grammar) return;
  $("template").textContent = grammar.template;
  if (!$("prompt").value) $("prompt").value = grammar.example;
  const words = matchTemplate(grammar, $("prompt").value) || {};
  const selects = Object.entries(grammar.vocabulary).map(([slot, choices]) => {
    const select = document.createElement("select");
    select.name = slot;
    select.title = slot;
    select.append(...choices.map((word) => new Option(word, word, false, word === words[slot])));
    select.addEventListener("change", () => {
      let prompt = grammar.template;
      for (const s of $("slots").querySelectorAll("select")) prompt = prompt.replace(`<${s.name}>`, s.value);
      $("prompt").value = prompt;
    });
    return select;
  });
  $("slots").replaceChildren(...selects);
}

// The prompt's word in each slot of the template, or null if it does not follow it.
function matchTemplate(grammar, prompt) {
  const slots = [];
  const pattern = grammar.template.replace(/<(\w+)>|[^<]+/g, (text, slot) => {
    if (!slot) return text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
    slots.push(slot);
    return "(\\S+)";
  });
  const match = new RegExp(`^${pattern}$`).exec(prompt.trim());
  return match && Object.fromEntries(slots.map((slot, i) => [slot, match[i + 1]]));
}

// -- create and follow a job ---------------------------------------------------------------------------------------

function requestBody() {
  const body = {prompt: $("prompt").value};
  for (const input of fieldInputs()) {
    const value = input.value.trim();
    if (value === "") continue;
    body[input.name] = input.type === "number" && Number.isFinite(Number(value)) ? Number(value) : value;
  }
  return body;
}

let following = null;  // the AbortController of the events stream being followed

async function submit(event) {
  event.preventDefault();
  showError(null);
  const response = await api("v1/videos", {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(requestBody()),
  });
  const video = await response.json();
  await loadJobs();
  await openJob(video.id);
}

async function openJob(id) {
  following?.abort();
  following = new AbortController();
  resetJobPanel(id);
  const signal = following.signal;
  let video = await (await api(`v1/videos/${id}`, {signal})).json();
  await showJob(video);
  if (video.status === "queued" || video.status === "in_progress") {
    await followEvents(id, signal);
    video = await (await api(`v1/videos/${id}`, {signal})).json();
    await showJob(video);
    await loadJobs();
  }
}

// The events stream (GET /v1/videos/{id}/events), read with fetch: EventSource cannot send the bearer token.
async function followEvents(id, signal) {
  const response = await api(`v1/videos/${id}/events`, {signal});
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const lines = buffer.slice(0, end).split("\n");
      buffer = buffer.slice(end + 2);
      const data = lines.filter((line) => line.startsWith("data:")).map((line) => line.slice(5)).join("\n");
      if (data) await showJob(JSON.parse(data));
    }
  }
}

const mediaUrls = new Map();  // "id/variant" -> blob: URL, fetched once

async function mediaUrl(id, variant) {
  const key = `${id}/${variant}`;
  if (!mediaUrls.has(key)) {
    const path = variant === "preview" ? `v1/videos/${id}/preview` : `v1/videos/${id}/content?variant=${variant}`;
    mediaUrls.set(key, URL.createObjectURL(await (await api(path)).blob()));
  }
  return mediaUrls.get(key);
}

function forgetMedia(id) {
  for (const [key, url] of mediaUrls) {
    if (key.startsWith(`${id}/`)) {
      URL.revokeObjectURL(url);
      mediaUrls.delete(key);
    }
  }
}

function resetJobPanel(id) {
  $("job").hidden = false;
  $("job").dataset.id = id;
  $("job-id").textContent = id;
  for (const figure of ["preview-figure", "video-figure", "thumbnail-figure"]) $(figure).hidden = true;
  $("video").removeAttribute("src");
  $("segments").replaceChildren();
  $("timeline").replaceChildren();
}

const statusOf = (video) => (video.cancelled ? "cancelled" : video.status);

async function showJob(video) {
  if ($("job").dataset.id !== video.id) return;
  $("job").dataset.status = statusOf(video);
  const where = video.stage && video.status === "in_progress" ? `, ${video.stage}` : "";
  const error = video.error && !video.cancelled ? `: ${video.error.message}` : "";
  $("job-status").textContent = `${statusOf(video)}${where}, ${video.progress}%${error}`;
  $("job-progress").value = video.progress;
  showSegments(video);
  showTimeline(video);
  if (video.preview_ready && $("preview-figure").hidden) {
    $("preview").src = await mediaUrl(video.id, "preview");
    $("preview-figure").hidden = false;
  }
  if (video.status === "completed" && $("video-figure").hidden) {
    const url = await mediaUrl(video.id, "video");
    $("video").src = url;
    $("download").href = url;
    $("download").download = `${video.id}.mp4`;
    $("video-figure").hidden = false;
    $("thumbnail").src = await mediaUrl(video.id, "thumbnail");
    $("thumbnail-figure").hidden = false;
  }
}

// Steps done per denoising segment: the finished ones from `segments`, the running one from `steps_done`.
function showSegments(video) {
  const steps = video.request.num_inference_steps;
  const items = video.segments.map((s) => `${s.stage}: steps ${s.start} to ${s.stop - 1} (${s.stop - s.start} of ${steps})`);
  const denoised = video.segments.reduce((sum, s) => sum + s.stop - s.start, 0);
  const running = video.status === "in_progress" && !video.segments.some((s) => s.stage === video.stage);
  if (running && video.steps_done > denoised) {
    items.push(`${video.stage}: ${video.steps_done - denoised} steps so far, from step ${denoised}`);
  }
  $("segments").replaceChildren(...items.map((text) => Object.assign(document.createElement("li"), {textContent: text})));
}

// One bar per stage, placed on the job's clock (the preview runs beside the render).
function showTimeline(video) {
  const stages = Object.entries(video.stages).filter(([, s]) => s.start);
  if (!stages.length) return;
  const now = Date.now() / 1000;
  const t0 = Math.min(...stages.map(([, s]) => s.start));
  const span = Math.max(...stages.map(([, s]) => s.end ?? now)) - t0 || 1;
  $("timeline").replaceChildren(...stages.map(([name, s]) => {
    const row = document.createElement("div");
    row.className = "stage";
    row.dataset.stage = name;
    const bar = document.createElement("span");
    bar.className = s.end ? "bar" : "bar running";
    bar.style.marginLeft = `${(100 * (s.start - t0)) / span}%`;
    bar.style.width = `${Math.max(0.5, (100 * ((s.end ?? now) - s.start)) / span)}%`;
    const label = s.end ? `${(s.end - s.start).toFixed(2)} s` : "running";
    row.append(Object.assign(document.createElement("span"), {className: "name", textContent: name}),
      Object.assign(document.createElement("span"), {className: "track"}), label);
    row.children[1].append(bar);
    return row;
  }));
}

// -- the job list: newest first, a page at a time ------------------------------------------------------------------

let lastId = null;  // the last id of the pages shown: `after` for the next one

async function loadJobs(older = false) {
  const query = new URLSearchParams({limit: PAGE_SIZE, ...(older && lastId ? {after: lastId} : {})});
  const page = await (await api(`v1/videos?${query}`)).json();
  if (!older) $("job-rows").replaceChildren();
  $("job-rows").append(...page.data.map(jobRow));
  lastId = page.last_id ?? lastId;
  $("more").hidden = !page.has_more;
  await Promise.all(page.data.filter((v) => v.status === "completed").map(async (video) => {
    const img = document.querySelector(`#job-rows tr[data-id="${video.id}"] img`);
    img.src = await mediaUrl(video.id, "thumbnail");
  }));
}

function jobRow(video) {
  const row = document.createElement("tr");
  row.dataset.id = video.id;
  row.dataset.status = statusOf(video);
  const cell = (...children) => {
    const td = document.createElement("td");
    td.append(...children);
    return td;
  };
  const button = (action, text, enabled) => {
    const b = Object.assign(document.createElement("button"), {type: "button", textContent: text, disabled: !enabled});
    b.dataset.action = action;
    return b;
  };
  const terminal = video.status === "completed" || video.status === "failed";
  row.append(
    cell(Object.assign(document.createElement("img"), {alt: "", className: "thumb"})),
    cell(video.prompt),
    cell(terminal ? statusOf(video) : `${statusOf(video)} ${video.progress}%`),
    cell(new Date(video.created_at * 1000).toLocaleTimeString()),
    cell(button("open", "Open", true), button("cancel", "Cancel", !terminal), button("delete", "Delete", terminal)),
  );
  return row;
}

async function jobAction(event) {
  const action = event.target.dataset?.action;
  const id = event.target.closest("tr")?.dataset.id;
  if (!action || !id) return;
  showError(null);
  if (action === "open") {
    await openJob(id);
  } else if (action === "cancel") {
    await api(`v1/videos/${id}/cancel`, {method: "POST"});
    await loadJobs();
  } else if (action === "delete") {
    await api(`v1/videos/${id}`, {method: "DELETE"});
    forgetMedia(id);
    if ($("job").dataset.id === id) $("job").hidden = true;
    await loadJobs();
  }
}

// -- start ---------------------------------------------------------------------------------------------------------

async function start() {
  showError(null);
  await loadModel();
  await loadJobs();
}

$("token").value = sessionStorage.getItem(TOKEN_KEY) ?? "";
$("token").addEventListener("change", guarded(async () => {
  const token = $("token").value.trim();
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  else sessionStorage.removeItem(TOKEN_KEY);
  await start();
}));
$("request").addEventListener("submit", guarded(submit));
$("refresh").addEventListener("click", guarded(() => loadJobs()));
$("more").addEventListener("click", guarded(() => loadJobs(true)));
$("job-rows").addEventListener("click", guarded(jobAction));
guarded(start)();
