// The chat page's behaviour. Talks to /v1/chat/completions with stream: true and usage.
// Images: upload, paste or drop (sent as data: URLs, shown as thumbnails); audio: upload or record
// (MediaRecorder, sent as base64 input_audio, decoded server-side with PyAV; shown as a player).
// Replies are Markdown rendered by marked and sanitised by DOMPurify while they stream (model
// output is untrusted; the page's Content-Security-Policy is the second line). Thinking shows
// collapsed; each reply ends with its tokens/s and token counts. Stop aborts the fetch, which makes
// the server cancel the request.
"use strict";
const $ = (id) => document.getElementById(id);
const messages = [];         // OpenAI messages sent so far (assistant replies as text)
let pending = [];            // {part, label, kind, url}: attachments for the next message
let threadURLs = [];         // object URLs shown in the thread; "new chat" revokes them
let controller = null;       // AbortController of the running request
let recorder = null;

marked.use({ gfm: true, breaks: true });
// no styles (the policy forbids inline ones anyway) and no form controls from model output
const PURIFY = { FORBID_TAGS: ["style", "form", "input", "textarea", "button", "select"], FORBID_ATTR: ["style"] };
DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") { node.setAttribute("target", "_blank"); node.setAttribute("rel", "noopener noreferrer"); }
});
function renderMarkdown(el, text) { el.innerHTML = DOMPurify.sanitize(marked.parse(text), PURIFY); }

function authHeaders() {
  return $("apiKey").value ? { Authorization: "Bearer " + $("apiKey").value } : {};
}

async function showModel() {
  const el = $("model");
  el.classList.remove("problem");
  try {
    const res = await fetch("/v1/models", { headers: authHeaders() });
    if (res.status === 401) throw new Error("enter the API key");
    if (!res.ok) throw new Error(res.statusText || String(res.status));
    const { data } = await res.json();
    el.textContent = data.map((m) => m.id).join(", ");
    el.dataset.ready = "1";
    if (data[0] && data[0].max_model_len) el.title = `context: ${data[0].max_model_len} tokens per conversation`;
  } catch (err) {
    el.textContent = "model: " + err.message; el.classList.add("problem"); delete el.dataset.ready;
  }
}

$("apiKey").value = localStorage.getItem("unigemma-key") || "";
$("apiKey").onchange = () => { localStorage.setItem("unigemma-key", $("apiKey").value); showModel(); };
showModel();

function readDataURL(file) {
  return new Promise((ok, fail) => { const r = new FileReader(); r.onload = () => ok(r.result); r.onerror = fail; r.readAsDataURL(file); });
}

async function attach(file) {
  const data = await readDataURL(file);
  let item;
  if (file.type.startsWith("image/")) {
    item = { part: { type: "image_url", image_url: { url: data } }, kind: "image", label: "image " + (file.name || "") };
  } else if (file.type.startsWith("audio/") || file.type.startsWith("video/webm")) {
    const format = (file.type.split("/")[1] || "wav").split(";")[0];
    item = { part: { type: "input_audio", input_audio: { data: data.split(",")[1], format } }, kind: "audio",
             label: "audio " + (file.name || format) };
  } else { showError("unsupported file type: " + (file.type || file.name)); return; }
  item.url = URL.createObjectURL(file);
  pending.push(item);
  renderAttachments();
}

function renderAttachments() {
  $("attachments").replaceChildren(...pending.map((p) => {
    const s = document.createElement("span"); s.textContent = p.label; return s;
  }));
}

$("attach").onclick = () => $("file").click();
$("file").onchange = async (e) => { for (const f of e.target.files) await attach(f); e.target.value = ""; };
document.addEventListener("paste", async (e) => {
  for (const item of e.clipboardData.items) { const f = item.getAsFile(); if (f) { e.preventDefault(); await attach(f); } }
});
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", async (e) => {
  e.preventDefault(); drop.classList.remove("over");
  for (const f of e.dataTransfer.files) await attach(f);
});

function setRecording(on) {
  $("record").classList.toggle("recording", on);
  $("record").title = on ? "stop recording" : "record from the microphone";
}

$("record").onclick = async () => {
  if (recorder) { recorder.stop(); return; }
  let stream;
  try { stream = await navigator.mediaDevices.getUserMedia({ audio: true }); }
  catch (err) { showError("microphone: " + err.message); return; }
  const chunks = [];
  recorder = new MediaRecorder(stream);
  recorder.ondataavailable = (e) => chunks.push(e.data);
  recorder.onstop = async () => {
    stream.getTracks().forEach((t) => t.stop());
    const type = recorder.mimeType || "audio/webm";
    recorder = null; setRecording(false);
    await attach(new File(chunks, "recording", { type }));
  };
  recorder.start(); setRecording(true);
};

function element(tag, cls, parent) {
  const el = document.createElement(tag); if (cls) el.className = cls;
  if (parent) parent.appendChild(el);
  return el;
}
function bubble(cls) {
  const div = element("div", "msg " + cls, $("log"));
  $("log").scrollTop = $("log").scrollHeight; return div;
}
function showError(text) { element("div", "error-text", bubble("assistant error")).textContent = text; }

$("clear").onclick = () => {
  messages.length = 0; $("log").replaceChildren();
  threadURLs.forEach((u) => URL.revokeObjectURL(u)); threadURLs = [];
};
$("stop").onclick = () => { if (controller) controller.abort(); };
$("input").addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); } });
$("send").onclick = () => send();

function showSent(items, text) {
  const user = bubble("user");
  if (items.length) {
    const media = element("div", "media", user);
    for (const p of items) {
      const el = element(p.kind === "image" ? "img" : "audio", "", media);
      el.src = p.url; threadURLs.push(p.url);
      if (p.kind === "image") el.alt = p.label; else el.controls = true;
    }
  }
  element("div", "text", user).textContent = text;
}

// "12.3 tokens/s · 40 prompt + 6 completion tokens": the first token's time is the prompt's
// (prefill), so the rate counts the tokens after it over the time after it
function statsLine(usage, seconds) {
  const n = usage.completion_tokens;
  const rate = n > 1 && seconds > 0 ? ((n - 1) / seconds).toFixed(1) : "–";
  const details = usage.completion_tokens_details || {};
  const thinking = details.reasoning_tokens ? ` (${details.reasoning_tokens} thinking)` : "";
  return `${rate} tokens/s · ${usage.prompt_tokens} prompt + ${n} completion tokens${thinking}`;
}

async function send() {
  const text = $("input").value.trim();
  if (!text && !pending.length) return;
  const parts = pending.map((p) => p.part);
  if (text) parts.push({ type: "text", text });
  showSent(pending, text);
  messages.push({ role: "user", content: parts });
  pending = []; renderAttachments(); $("input").value = "";

  const reply = bubble("assistant");
  const reasoning = element("details", "reasoning", reply);
  element("summary", "", reasoning).textContent = "thinking";
  const thought = element("div", "thought", reasoning);
  reasoning.hidden = true;
  const content = element("div", "content", reply);
  const tools = element("div", "tools", reply);
  controller = new AbortController();
  $("send").disabled = true; $("stop").disabled = false;
  let answer = "", first = null, usage = null, queued = false;
  // re-render the whole answer at most once a frame: Markdown only parses right as a whole
  const render = () => { queued = false; renderMarkdown(content, answer); };
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json", ...authHeaders() }, signal: controller.signal,
      body: JSON.stringify({ messages, stream: true, stream_options: { include_usage: true },
                             max_tokens: Number($("maxTokens").value) || 256,
                             chat_template_kwargs: { enable_thinking: $("think").checked } }),
    });
    if (!res.ok) { const err = await res.json().catch(() => ({})); throw new Error((err.error && err.error.message) || res.statusText); }
    const reader = res.body.getReader(); const decoder = new TextDecoder(); let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const line = buf.slice(0, cut); buf = buf.slice(cut + 2);
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") continue;
        const msg = JSON.parse(data);
        if (msg.error) throw new Error(msg.error.message);
        if (msg.usage) usage = msg.usage;
        for (const c of msg.choices || []) {
          const d = c.delta || {};
          if ((d.content || d.reasoning_content) && first === null) first = performance.now();
          if (d.reasoning_content) { reasoning.hidden = false; thought.textContent += d.reasoning_content; }
          if (d.content) {
            answer += d.content;
            if (!queued) { queued = true; requestAnimationFrame(render); }
          }
          for (const call of d.tool_calls || []) {
            tools.textContent += `[tool call] ${call.function.name || ""}(${call.function.arguments || ""})\n`;
          }
          if (c.finish_reason) reply.dataset.finish = c.finish_reason;
        }
        $("log").scrollTop = $("log").scrollHeight;
      }
    }
    if (usage) element("div", "stats", reply).textContent = statsLine(usage, first === null ? 0 : (performance.now() - first) / 1000);
  } catch (err) {
    if (err.name === "AbortError") reply.dataset.finish = "stopped";
    else { reply.classList.add("error"); element("div", "error-text", reply).textContent = "error: " + err.message; }
  } finally {
    render();
    messages.push({ role: "assistant", content: answer });
    controller = null; $("send").disabled = false; $("stop").disabled = true;
    reply.dataset.done = "1";
    $("log").scrollTop = $("log").scrollHeight;
  }
}
