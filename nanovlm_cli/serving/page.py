"""The chat page served at GET /: one self-contained HTML file (inline CSS and JS, no external assets), so it works
offline. It keeps the conversation in the browser, sends it to /v1/chat/completions with `stream: true` and
renders the server-sent deltas as they arrive; an image is picked, pasted or dropped and sent as a data: URL."""

from __future__ import annotations

import html
import json

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>nanovlm chat</title>
<style>
 body { font: 15px/1.45 system-ui, sans-serif; margin: 0; background: #f5f5f4; color: #1c1917; }
 header { padding: 10px 16px; background: #1c1917; color: #fafaf9; font-weight: 600; }
 header span { font-weight: 400; opacity: .7; margin-left: 8px; }
 #log { max-width: 820px; margin: 0 auto; padding: 16px; min-height: 60vh; }
 .msg { margin: 10px 0; padding: 10px 12px; border-radius: 10px; white-space: pre-wrap; word-break: break-word; }
 .user { background: #dbeafe; margin-left: 15%; }
 .assistant { background: #fff; border: 1px solid #e7e5e4; margin-right: 15%; }
 .error { background: #fee2e2; color: #991b1b; }
 .msg img { max-width: 160px; max-height: 160px; display: block; margin-bottom: 6px; border-radius: 6px; }
 form { position: sticky; bottom: 0; background: #fafaf9; border-top: 1px solid #e7e5e4; padding: 10px 16px; }
 .row { max-width: 820px; margin: 0 auto; display: flex; gap: 8px; align-items: flex-end; }
 textarea { flex: 1; resize: vertical; min-height: 44px; padding: 8px; font: inherit; border-radius: 8px;
            border: 1px solid #d6d3d1; }
 textarea.drop { outline: 3px dashed #3b82f6; }
 button, label.pick { padding: 9px 14px; border-radius: 8px; border: 0; background: #2563eb; color: #fff;
                      font: inherit; cursor: pointer; }
 label.pick { background: #57534e; }
 #attached { max-width: 820px; margin: 0 auto 6px; font-size: 13px; color: #57534e; }
 .settings { font-size: 13px; color: #57534e; margin-top: 6px; gap: 16px; }
 .settings input { width: 70px; }
 #attached img { height: 40px; vertical-align: middle; margin-right: 4px; border-radius: 4px; }
</style></head>
<body>
<header>nanovlm<span id="model">__MODEL_HTML__</span></header>
<div id="log"></div>
<form id="form">
 <div id="attached"></div>
 <div class="row">
  <label class="pick" title="Attach an image">Image<input id="file" type="file" accept="image/*" hidden></label>
  <textarea id="input" placeholder="Ask about an image (paste or drop one here). Enter sends, Shift+Enter breaks."></textarea>
  <button id="send" type="submit">Send</button>
  <button id="reset" type="button" style="background:#78716c">Reset</button>
 </div>
 <div class="row settings">
  <label>temperature <input id="temperature" type="number" min="0" max="2" step="0.1" value="0.7"></label>
  <label>max tokens <input id="max_tokens" type="number" min="1" step="1" value="256"></label>
 </div>
</form>
<script>
const MODEL = __MODEL_JSON__;
const log = document.getElementById("log"), input = document.getElementById("input");
const attached = document.getElementById("attached"), sendButton = document.getElementById("send");
let history = [], pending = [];

function bubble(role, text, images) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  for (const url of images || []) { const img = document.createElement("img"); img.src = url; div.appendChild(img); }
  const span = document.createElement("span"); span.textContent = text; div.appendChild(span);
  log.appendChild(div); div.scrollIntoView({block: "end"});
  return span;
}
function showAttached() {
  attached.innerHTML = "";
  for (const url of pending) { const img = document.createElement("img"); img.src = url; attached.appendChild(img); }
  if (pending.length) attached.appendChild(document.createTextNode(pending.length + " image(s) attached"));
}
function attach(file) {
  if (!file || !file.type.startsWith("image/")) return;
  const reader = new FileReader();
  reader.onload = () => { pending.push(reader.result); showAttached(); };
  reader.readAsDataURL(file);
}
document.getElementById("file").addEventListener("change", e => { for (const f of e.target.files) attach(f); e.target.value = ""; });
input.addEventListener("paste", e => { for (const item of e.clipboardData.items) if (item.kind === "file") attach(item.getAsFile()); });
input.addEventListener("dragover", e => { e.preventDefault(); input.classList.add("drop"); });
input.addEventListener("dragleave", () => input.classList.remove("drop"));
input.addEventListener("drop", e => { e.preventDefault(); input.classList.remove("drop"); for (const f of e.dataTransfer.files) attach(f); });
input.addEventListener("keydown", e => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); } });
document.getElementById("form").addEventListener("submit", e => { e.preventDefault(); send(); });
document.getElementById("reset").addEventListener("click", () => { history = []; pending = []; showAttached(); log.innerHTML = ""; });

async function send() {
  const text = input.value.trim();
  if (!text && !pending.length) return;
  const content = pending.map(url => ({type: "image_url", image_url: {url}}));
  content.push({type: "text", text});
  bubble("user", text, pending);
  history.push({role: "user", content});
  pending = []; showAttached(); input.value = ""; sendButton.disabled = true;
  const out = bubble("assistant", "");
  let answer = "";
  try {
    const response = await fetch("/v1/chat/completions", {method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({model: MODEL, messages: history, stream: true,
        temperature: Number(document.getElementById("temperature").value),
        max_tokens: Number(document.getElementById("max_tokens").value)})});
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error((body.error && body.error.message) || response.statusText);
    }
    const reader = response.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {done, value} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\\n\\n")) >= 0) {
        const event = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        for (const choice of chunk.choices || []) if (choice.delta && choice.delta.content) {
          answer += choice.delta.content; out.textContent = answer;
        }
      }
    }
    history.push({role: "assistant", content: answer});
    out.parentElement.dataset.done = "1";
  } catch (err) {
    out.parentElement.className = "msg error"; out.textContent = "error: " + err.message;
    history.pop();
  } finally { sendButton.disabled = false; input.focus(); }
}
</script>
</body></html>
"""


def chat_page(model_id: str) -> str:
    """The page's HTML for a server of `model_id`."""
    return (_PAGE.replace("__MODEL_HTML__", html.escape(model_id))
            .replace("__MODEL_JSON__", json.dumps(model_id).replace("<", "\\u003c")))
