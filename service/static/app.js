// The xmodal search page: plain JavaScript, no build step, nothing loaded from elsewhere.
// It calls the REST API directly: POST /search, POST /ingest, GET /jobs/{id},
// GET /items/{id}/thumbnail and GET /ui/config.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const KEY_STORAGE = "xmodal-api-key";
  const ID_CHARS = /[^A-Za-z0-9._:@+=-]/g;
  const DEFAULT_TARGETS = ["image", "video"]; // what a text query looks for by default

  const state = {
    config: null,
    key: sessionStorage.getItem(KEY_STORAGE) || "",
    file: null, // a File to search with
    item: null, // an item id to search with ("Similar")
    seq: 0, // the newest search; older answers are dropped
    objectUrls: [],
  };

  // ---- API calls --------------------------------------------------------------------------

  function withKey(headers) {
    const out = Object.assign({}, headers || {});
    if (state.key) out["X-API-Key"] = state.key;
    return out;
  }

  async function errorMessage(res) {
    try {
      const body = await res.clone().json();
      if (body && body.error) return body.error;
    } catch (_) {
      /* not JSON */
    }
    return `${res.status} ${res.statusText}`;
  }

  // fetch() with the API key; on 401/403 ask for a key (with the server's reason) and retry,
  // until a key works or the dialog is cancelled.
  async function api(path, options) {
    const opts = Object.assign({}, options || {});
    const send = () => fetch(path, Object.assign({}, opts, { headers: withKey(opts.headers) }));
    let res = await send();
    while (res.status === 401 || res.status === 403) {
      const key = await askKey(await errorMessage(res));
      if (key === null) break;
      res = await send();
    }
    return res;
  }

  // ---- the API key dialog ---------------------------------------------------------------

  function askKey(reason) {
    const dialog = $("key-dialog");
    const input = $("key-input");
    $("key-reason").textContent = reason || "This service needs an API key.";
    input.value = state.key;
    return new Promise((resolve) => {
      const done = (key) => {
        dialog.removeEventListener("close", onClose);
        $("key-form").removeEventListener("submit", onSubmit);
        $("key-cancel").removeEventListener("click", onCancel);
        if (dialog.open) dialog.close();
        resolve(key);
      };
      const onSubmit = (event) => {
        event.preventDefault();
        const key = input.value.trim();
        if (!key) return;
        state.key = key;
        sessionStorage.setItem(KEY_STORAGE, key);
        done(key);
      };
      const onCancel = () => done(null);
      const onClose = () => done(null);
      $("key-form").addEventListener("submit", onSubmit);
      $("key-cancel").addEventListener("click", onCancel);
      dialog.addEventListener("close", onClose);
      if (typeof dialog.showModal === "function") dialog.showModal();
      else dialog.setAttribute("open", "");
      input.focus();
    });
  }

  // ---- the form <-> the URL -------------------------------------------------------------

  function checkedTargets() {
    return [...document.querySelectorAll('input[name="targets"]:checked')].map((i) => i.value);
  }

  function formToParams() {
    const params = new URLSearchParams();
    const q = $("q").value.trim();
    if (state.item) params.set("item", state.item);
    else if (q) params.set("q", q);
    const targets = checkedTargets();
    if (targets.length) params.set("targets", targets.join(","));
    params.set("qbnorm", $("qbnorm").checked ? "on" : "off");
    if ($("min-score-on").checked) params.set("min_score", $("min-score").value);
    if ($("top-k").value !== "20") params.set("k", $("top-k").value);
    return params;
  }

  function paramsToForm(params) {
    $("q").value = params.get("q") || "";
    setItem(params.get("item"));
    let targets = params.getAll("targets").join(",").split(",").filter(Boolean);
    if (!targets.length) targets = DEFAULT_TARGETS;
    for (const box of document.querySelectorAll('input[name="targets"]')) {
      box.checked = targets.includes(box.value);
    }
    const qb = params.get("qbnorm");
    if (qb !== null) $("qbnorm").checked = ["on", "1", "true", "yes"].includes(qb.toLowerCase());
    else $("qbnorm").checked = Boolean(state.config && state.config.qbnorm_default);
    const min = params.get("min_score");
    const minOn = min !== null && min !== "" && Number.isFinite(Number(min));
    $("min-score-on").checked = minOn;
    $("min-score").disabled = !minOn;
    if (minOn) $("min-score").value = String(Math.max(-1, Math.min(1, Number(min))));
    showMinScore();
    const k = params.get("k");
    if (k && [...$("top-k").options].some((o) => o.value === k)) $("top-k").value = k;
  }

  function updateUrl(push) {
    const params = formToParams();
    const hasQuery = params.has("q") || params.has("item");
    const url = hasQuery ? `/?${params.toString()}` : "/";
    if (url === `${location.pathname}${location.search}`) return;
    if (push) history.pushState(null, "", url);
    else history.replaceState(null, "", url);
  }

  function showMinScore() {
    $("min-score-value").textContent = Number($("min-score").value).toFixed(2);
  }

  // ---- searching --------------------------------------------------------------------------

  function hasQuery() {
    return Boolean(state.file || state.item || $("q").value.trim());
  }

  function searchRequest() {
    const targets = checkedTargets();
    const opts = {
      top_k: Number($("top-k").value),
      qbnorm: $("qbnorm").checked,
    };
    if (targets.length) opts.targets = targets;
    if ($("min-score-on").checked) opts.min_score = Number($("min-score").value);
    if (state.file) {
      const form = new FormData();
      form.append("file", state.file, state.file.name);
      form.append("top_k", String(opts.top_k));
      form.append("qbnorm", String(opts.qbnorm));
      if (opts.targets) form.append("targets", opts.targets.join(","));
      if (opts.min_score !== undefined) form.append("min_score", String(opts.min_score));
      return { method: "POST", body: form };
    }
    const body = Object.assign(opts, state.item ? { item_id: state.item } : { text: $("q").value.trim() });
    return {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    };
  }

  async function search(push) {
    if (!state.file) updateUrl(push);
    if (!hasQuery()) {
      clearResults();
      setStatus("Type a few words, or pick a picture, to search.");
      return;
    }
    const seq = ++state.seq;
    const results = $("results");
    results.setAttribute("aria-busy", "true");
    setStatus("Searching…");
    let res;
    try {
      res = await api("/search", searchRequest());
    } catch (err) {
      if (seq === state.seq) {
        results.removeAttribute("aria-busy");
        setStatus(`The service did not answer: ${err.message}`, true);
      }
      return;
    }
    if (seq !== state.seq) return;
    results.removeAttribute("aria-busy");
    if (!res.ok) {
      clearResults();
      setStatus(`Search failed: ${await errorMessage(res)}`, true);
      return;
    }
    const data = await res.json();
    if (seq !== state.seq) return;
    render(data);
  }

  function qbnormNote(data) {
    if (data.qbnorm_applied) return "QB-Norm applied";
    if ($("qbnorm").checked) return "QB-Norm not applied (no query bank, or not a text query)";
    return "QB-Norm off";
  }

  function render(data) {
    clearResults();
    const list = $("results");
    for (const hit of data.results) list.appendChild(card(hit));
    const n = data.results.length;
    const found = n === 0 ? "No results" : `${n} result${n === 1 ? "" : "s"}`;
    setStatus(`${found} in ${Math.round(data.took_ms)} ms · ${qbnormNote(data)}`);
    list.dataset.qbnormApplied = String(data.qbnorm_applied);
  }

  function clearResults() {
    for (const url of state.objectUrls) URL.revokeObjectURL(url);
    state.objectUrls = [];
    $("results").replaceChildren();
  }

  function setStatus(text, isError) {
    const el = $("status");
    el.textContent = text;
    el.classList.toggle("error", Boolean(isError));
  }

  // ---- result cards ------------------------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else node.setAttribute(k, v);
    }
    for (const child of children) if (child) node.appendChild(child);
    return node;
  }

  function thumbUrl(id, extra) {
    return `/items/${encodeURIComponent(id)}/thumbnail${extra || ""}`;
  }

  function needsKeyForReads() {
    return Boolean(state.key && state.config && state.config.auth.read);
  }

  // <img src> cannot send a key: with read keys, fetch the thumbnail and use a blob: URL.
  async function setImage(img, url) {
    if (!needsKeyForReads()) {
      img.src = url;
      return;
    }
    try {
      const res = await fetch(url, { headers: withKey() });
      if (!res.ok) throw new Error(String(res.status));
      const blobUrl = URL.createObjectURL(await res.blob());
      state.objectUrls.push(blobUrl);
      img.src = blobUrl;
    } catch (_) {
      img.dispatchEvent(new Event("error"));
    }
  }

  function label(hit) {
    const m = hit.metadata || {};
    for (const key of ["caption", "title", "filename", "name"]) {
      if (typeof m[key] === "string" && m[key]) return m[key];
    }
    return hit.id;
  }

  function clock(seconds) {
    const s = Math.max(0, Number(seconds) || 0);
    const m = Math.floor(s / 60);
    const rest = s - m * 60;
    return `${m}:${rest < 10 ? "0" : ""}${rest.toFixed(rest % 1 ? 1 : 0)}`;
  }

  function scores(hit) {
    return el(
      "p",
      { class: "scores" },
      el("span", { class: "score", text: `score ${hit.score.toFixed(3)}` }),
      el("span", { class: "raw-score", text: `raw ${hit.raw_score.toFixed(3)}` }),
    );
  }

  function playableUrl(hit) {
    const url = (hit.metadata || {}).url;
    if (typeof url !== "string") return null;
    if (url.startsWith("/") || /^https?:\/\//i.test(url)) return url;
    return null;
  }

  function card(hit) {
    const name = label(hit);
    const li = el("li", {
      class: `card card-${hit.modality}`,
      "data-id": hit.id,
      "data-modality": hit.modality,
      "data-score": String(hit.score),
      "data-raw-score": String(hit.raw_score),
      "data-start": hit.start === null || hit.start === undefined ? null : String(hit.start),
    });
    const figure = el("figure");
    if (hit.modality === "text") {
      const quote = el("blockquote", { class: "text", text: textOf(hit) || "…" });
      if (!textOf(hit)) loadText(quote, hit.id);
      figure.appendChild(quote);
    } else {
      const media = el("div", { class: "media" });
      const isVideo = hit.modality === "video";
      const at = isVideo && hit.start !== null && hit.start !== undefined ? hit.start : null;
      const url = thumbUrl(hit.id, at !== null ? `?at=${at}` : "");
      const playable = isVideo ? playableUrl(hit) : null;
      if (playable) {
        const end = hit.end !== null && hit.end !== undefined ? `,${hit.end}` : "";
        const video = el("video", {
          controls: "",
          preload: "metadata",
          src: `${playable}#t=${at || 0}${end}`,
          "aria-label": `${name}, from ${clock(at)}`,
        });
        video.addEventListener("loadedmetadata", () => {
          if (at !== null && Math.abs(video.currentTime - at) > 0.5) video.currentTime = at;
        });
        if (!needsKeyForReads()) video.poster = url;
        media.appendChild(video);
      } else {
        const img = el("img", {
          alt: isVideo ? `${name}, frame at ${clock(at)}` : name,
          loading: "lazy",
          decoding: "async",
        });
        img.addEventListener("error", () => {
          img.replaceWith(el("span", { class: "no-preview", text: "no preview" }));
        });
        setImage(img, url);
        media.appendChild(img);
      }
      if (isVideo && at !== null) {
        media.appendChild(
          el("span", {
            class: "segment",
            text: `${clock(hit.start)}–${clock(hit.end)}`,
            "aria-label": `segment ${clock(hit.start)} to ${clock(hit.end)}`,
          }),
        );
      }
      figure.appendChild(media);
    }
    const caption = el("figcaption", {}, el("span", { class: "name", text: name }));
    if (name !== hit.id) caption.appendChild(el("span", { class: "id", text: hit.id }));
    caption.appendChild(scores(hit));
    figure.appendChild(caption);
    li.appendChild(figure);
    const similar = el("button", {
      type: "button",
      class: "secondary similar",
      text: "Similar",
      "aria-label": `Find items similar to ${name}`,
    });
    similar.addEventListener("click", () => {
      $("q").value = "";
      setFile(null);
      setItem(hit.id);
      search(true);
    });
    li.appendChild(similar);
    return li;
  }

  function textOf(hit) {
    const m = hit.metadata || {};
    return typeof m.text === "string" ? m.text : "";
  }

  async function loadText(node, id) {
    try {
      const res = await fetch(thumbUrl(id), { headers: withKey() });
      node.textContent = res.ok ? await res.text() : `(${id}: text not stored)`;
    } catch (_) {
      node.textContent = `(${id}: text not available)`;
    }
  }

  // ---- query by picture / by item ---------------------------------------------------------

  function setFile(file) {
    state.file = file || null;
    $("query-file").hidden = !state.file;
    const preview = $("query-file-preview");
    if (preview.dataset.url) URL.revokeObjectURL(preview.dataset.url);
    preview.removeAttribute("src");
    delete preview.dataset.url;
    if (state.file) {
      $("query-file-name").textContent = state.file.name;
      if (state.file.type.startsWith("image/")) {
        preview.dataset.url = URL.createObjectURL(state.file);
        preview.src = preview.dataset.url;
        preview.hidden = false;
      } else {
        preview.hidden = true;
      }
      setItem(null);
    } else {
      $("query-file-input").value = "";
    }
  }

  function setItem(id) {
    state.item = id || null;
    $("query-item").hidden = !state.item;
    $("query-item-name").textContent = state.item || "";
  }

  function dropZone(zone, onFiles) {
    zone.addEventListener("dragover", (event) => {
      event.preventDefault();
      zone.classList.add("dragging");
    });
    zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
    zone.addEventListener("drop", (event) => {
      event.preventDefault();
      zone.classList.remove("dragging");
      const files = [...(event.dataTransfer ? event.dataTransfer.files : [])];
      if (files.length) onFiles(files);
    });
  }

  // ---- ingest panel -----------------------------------------------------------------------

  function itemId(name) {
    let id = name.replace(ID_CHARS, "_").slice(0, 200);
    if (!/^[A-Za-z0-9_]/.test(id)) id = `_${id}`;
    return id;
  }

  function modalityOf(file) {
    if (file.type.startsWith("image/")) return "image";
    if (file.type.startsWith("video/")) return "video";
    if (file.type.startsWith("text/") || /\.txt$/i.test(file.name)) return "text";
    return null;
  }

  function base64(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(String(reader.result).split(",", 2)[1] || "");
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(file);
    });
  }

  function ingestStatus(text, isError) {
    const node = $("ingest-status");
    node.textContent = text;
    node.classList.toggle("error", Boolean(isError));
  }

  async function ingest(files) {
    const errors = $("ingest-errors");
    errors.replaceChildren();
    const cfg = state.config || { max_batch_items: 256, max_body_mb: 64 };
    const maxBytes = cfg.max_body_mb * 1024 * 1024 * 0.7; // base64 grows by 4/3
    const batches = [];
    let batch = [];
    let bytes = 0;
    const seen = new Set();
    for (const file of files) {
      const modality = modalityOf(file);
      if (!modality) {
        errors.appendChild(el("li", { text: `${file.name}: skipped (not an image, video or text)` }));
        continue;
      }
      let id = itemId(file.name);
      while (seen.has(id)) id = `${id}_`;
      seen.add(id);
      const item = { id, modality, metadata: { filename: file.name, source: "page" } };
      if (modality === "text") item.text = await file.text();
      else item.data = await base64(file);
      const size = file.size;
      if (batch.length && (batch.length >= cfg.max_batch_items || bytes + size > maxBytes)) {
        batches.push(batch);
        batch = [];
        bytes = 0;
      }
      batch.push(item);
      bytes += size;
    }
    if (batch.length) batches.push(batch);
    const total = batches.reduce((n, b) => n + b.length, 0);
    if (!total) {
      ingestStatus("Nothing to index.", true);
      return;
    }
    const bar = $("ingest-progress");
    $("ingest-progress-row").hidden = false;
    bar.max = total;
    bar.value = 0;
    ingestStatus(`Sending ${total} file${total === 1 ? "" : "s"}…`);
    const jobs = [];
    const refused = []; // items the API turned down at once (corrupt, too large...)
    const post = (items) =>
      api("/ingest", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ items }),
      });
    for (const items of batches) {
      const res = await post(items);
      if (res.ok) {
        jobs.push((await res.json()).job_id);
        continue;
      }
      const message = await errorMessage(res);
      if (res.status >= 500 || [401, 403, 429].includes(res.status)) {
        ingestStatus(`Ingest refused: ${message}`, true);
        return;
      }
      if (items.length === 1) {
        refused.push(`${items[0].id}: ${message}`);
        continue;
      }
      // One bad file refuses its whole batch: send the items one by one to index the rest.
      for (const item of items) {
        const one = await post([item]);
        if (one.ok) jobs.push((await one.json()).job_id);
        else refused.push(`${item.id}: ${await errorMessage(one)}`);
      }
    }
    await followJobs(jobs, total, refused);
  }

  async function followJobs(jobIds, total, refused) {
    const bar = $("ingest-progress");
    const errors = $("ingest-errors");
    const finished = new Map();
    for (;;) {
      let indexed = 0;
      let failed = refused.length;
      let pending = false;
      const failures = [...refused];
      for (const id of jobIds) {
        let job = finished.get(id);
        if (!job) {
          const res = await api(`/jobs/${encodeURIComponent(id)}`);
          if (!res.ok) {
            ingestStatus(`Job ${id}: ${await errorMessage(res)}`, true);
            return;
          }
          job = await res.json();
          if (job.state === "done" || job.state === "failed") finished.set(id, job);
          else pending = true;
        }
        for (const item of job.items) {
          if (item.state === "indexed") indexed += 1;
          else if (item.state === "failed") {
            failed += 1;
            failures.push(`${item.id}: ${item.error || "failed"}`);
          }
        }
      }
      bar.value = indexed + failed;
      const failedText = failed ? `, ${failed} failed` : "";
      if (!pending) {
        errors.replaceChildren(...failures.map((text) => el("li", { text })));
        ingestStatus(`Done: ${indexed} of ${total} indexed${failedText}.`, failed > 0);
        if (hasQuery()) search(false);
        return;
      }
      ingestStatus(`Indexing: ${indexed + failed} of ${total} done${failedText}…`);
      await new Promise((resolve) => setTimeout(resolve, 500));
    }
  }

  // ---- wiring -----------------------------------------------------------------------------

  async function loadConfig() {
    try {
      const res = await fetch("/ui/config");
      if (res.ok) state.config = await res.json();
    } catch (_) {
      /* an older service: keep defaults */
    }
    const auth = state.config ? state.config.auth : { read: false, write: false };
    $("key-button").hidden = !(auth.read || auth.write);
    return auth;
  }

  async function start() {
    $("search-form").addEventListener("submit", (event) => {
      event.preventDefault();
      if ($("q").value.trim()) {
        setItem(null);
        setFile(null);
      }
      search(true);
    });
    const rerun = () => {
      if (hasQuery()) search(false);
      else updateUrl(false);
    };
    for (const box of document.querySelectorAll('input[name="targets"]')) {
      box.addEventListener("change", rerun);
    }
    $("qbnorm").addEventListener("change", rerun);
    $("top-k").addEventListener("change", rerun);
    $("min-score-on").addEventListener("change", () => {
      $("min-score").disabled = !$("min-score-on").checked;
      rerun();
    });
    $("min-score").addEventListener("input", showMinScore);
    $("min-score").addEventListener("change", rerun);
    $("query-file-input").addEventListener("change", () => {
      const file = $("query-file-input").files[0];
      if (file) {
        setFile(file);
        search(false);
      }
    });
    $("query-file-clear").addEventListener("click", () => {
      setFile(null);
      clearResults();
      setStatus("");
      $("q").focus();
    });
    $("query-item-clear").addEventListener("click", () => {
      setItem(null);
      clearResults();
      setStatus("");
      updateUrl(true);
      $("q").focus();
    });
    dropZone($("search-drop"), (files) => {
      setFile(files[0]);
      search(false);
    });
    dropZone($("ingest-drop"), (files) => ingest(files));
    $("ingest-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const files = [...$("ingest-files").files];
      if (files.length) ingest(files);
      else ingestStatus("Pick or drop some files first.", true);
    });
    $("key-button").addEventListener("click", async () => {
      if ((await askKey("Enter the API key to use with this service.")) && hasQuery()) search(false);
    });
    window.addEventListener("popstate", () => {
      setFile(null);
      paramsToForm(new URLSearchParams(location.search));
      search(false);
    });

    const auth = await loadConfig();
    paramsToForm(new URLSearchParams(location.search));
    if (auth.read && !state.key) await askKey("This service needs an API key to search.");
    if (hasQuery()) search(false);
    document.body.dataset.ready = "true";
  }

  start();
})();
