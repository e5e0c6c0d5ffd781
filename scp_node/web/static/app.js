// scp-node dashboard: preview load marker and the live job log (server-sent events).
"use strict";

function markPreview() {
  const img = document.getElementById("preview");
  if (!img) return;
  const mark = () => { if (img.naturalWidth > 0) img.dataset.loaded = String(img.naturalWidth); };
  if (img.complete) mark();
  img.addEventListener("load", mark);
  img.addEventListener("error", () => { img.dataset.loaded = "error"; });
}

function followLog() {
  const log = document.getElementById("log");
  if (!log || !window.EventSource) return;
  const live = document.getElementById("live");
  const jobId = log.dataset.jobId;
  const pageState = log.dataset.state;
  const source = new EventSource(`/jobs/${jobId}/events?after=${log.dataset.lastEventId}`);
  source.onopen = () => live && live.classList.add("on");
  source.onerror = () => live && live.classList.remove("on");
  source.addEventListener("job", (msg) => {
    const e = JSON.parse(msg.data);
    if (log.querySelector(`[data-event-id="${e.id}"]`)) return;
    const line = document.createElement("span");
    line.className = e.level;
    line.dataset.eventId = String(e.id);
    line.textContent = `${e.time} ${e.stage.padEnd(10)} ${e.state.padEnd(10)} ${e.message}\n`;
    log.appendChild(line);
    log.scrollTop = log.scrollHeight;
    // A new state changes the timeline, deliveries and buttons: render them again.
    if (e.state !== pageState) { source.close(); window.setTimeout(() => location.reload(), 300); }
  });
}

document.addEventListener("DOMContentLoaded", () => { markPreview(); followLog(); });
