// Runs in the report page. Served by `catalog review` it saves every decision with a POST
// (queued in localStorage until the server has it); opened from disk it keeps decisions in
// localStorage and exports them as JSON for `catalog review RUN_DIR --import FILE`.
(function () {
  'use strict';
  const $ = (s, r) => (r || document).querySelector(s);
  const $$ = (s, r) => Array.from((r || document).querySelectorAll(s));
  const DATA = JSON.parse($('#report-data').textContent);
  const report = window.catalogReport;
  const REASONS = new Map(DATA.reasons);
  const STORE = 'catalog-gen:' + DATA.run_key + ':';
  const keyOf = (sku, candidate) => JSON.stringify([sku, candidate]);

  const tiles = new Map();          // key -> candidate element
  const entryOf = new Map();        // element -> {sku, candidate}
  for (const el of $$('.cand')) {
    const tile = DATA.tiles[+el.dataset.index];
    if (!tile) continue;
    const item = {sku: tile[0], candidate: tile[1]};
    tiles.set(keyOf(item.sku, item.candidate), el);
    entryOf.set(el, item);
  }
  let decisions = new Map();        // key -> stored row
  let mode = location.protocol === 'file:' ? 'static' : 'connecting';
  let current = null;
  const history = [];               // [{key, previous row or null}] for undo
  let queue = load('pending', []);  // server mode: entries not yet confirmed by the server
  let sending = false, retryTimer = null, lastError = '';

  // ---- storage and status
  function load(name, fallback) {
    try { const v = localStorage.getItem(STORE + name); return v === null ? fallback : JSON.parse(v); }
    catch (err) { return fallback; }
  }
  function save(name, value) {
    try { localStorage.setItem(STORE + name, JSON.stringify(value)); return true; }
    catch (err) { toast('This browser cannot store decisions: ' + err.message, true); return false; }
  }
  let toastTimer = null;
  function toast(text, bad) {
    const el = $('#toast');
    el.textContent = text;
    el.className = 'show' + (bad ? ' bad' : '');
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { el.className = ''; }, bad ? 6000 : 1600);
  }
  function setMode(text, cls) {
    const el = $('#mode');
    el.textContent = text;
    el.className = 'mode ' + (cls || '');
  }
  function showMode() {
    if (mode === 'static') {
      setMode('Opened from disk: decisions are kept in this browser; use Export decisions to hand them in', '');
    } else if (mode === 'server') {
      setMode(queue.length ? `Saving ${queue.length}\u2026` : 'Saved to the run folder', 'server');
    } else if (mode === 'offline') {
      setMode(`Not saved yet (${queue.length}), retrying: ${lastError || 'server unreachable'}`, 'warn');
    }
  }
  const reviewerInput = $('#reviewer');
  reviewerInput.value = (() => { try { return localStorage.getItem('catalog-gen:reviewer') || ''; } catch (e) { return ''; } })();
  reviewerInput.addEventListener('change', () => {
    try { localStorage.setItem('catalog-gen:reviewer', reviewerInput.value.trim()); } catch (e) { /* private mode */ }
  });
  const reviewer = () => reviewerInput.value.trim();

  // ---- showing decisions
  function render(el) {
    const item = entryOf.get(el);
    const row = decisions.get(keyOf(item.sku, item.candidate));
    const state = $('.state', el);
    el.classList.toggle('approved', !!row && row.decision === 'approve');
    el.classList.toggle('rejected', !!row && row.decision === 'reject');
    el.dataset.review = row ? (row.decision === 'approve' ? 'approved' : 'rejected') : 'undecided';
    if (!state) return;
    if (!row) { state.textContent = ''; el.removeAttribute('title'); return; }
    state.textContent = row.decision === 'approve' ? '\u2713 Approved'
      : '\u2717 Rejected: ' + (REASONS.get(row.reason_code) || row.reason_code) + (row.note ? ' \u2013 ' + row.note : '');
    el.title = `${row.decision} by ${row.reviewer || '?'} at ${row.decided_at || '?'}`;
  }
  // Progress is over the kept candidates: those are what export and the next night act on; a reviewer
  // need not look at the ones the gates dropped (deciding them is counted apart).
  const keptKeys = new Set(Array.from(tiles).filter(([, el]) => el.dataset.kept === '1').map(([key]) => key));
  function progress() {
    let approved = 0, rejected = 0, others = 0;
    for (const [key, row] of decisions) {
      if (!tiles.has(key)) continue;
      if (!keptKeys.has(key)) { others += 1; continue; }
      if (row.decision === 'approve') approved += 1; else rejected += 1;
    }
    const done = approved + rejected, total = keptKeys.size;
    $('#progress-text').textContent = `${done} / ${total} kept reviewed \u00b7 ${approved} approved \u00b7 ${rejected} rejected`
      + (others ? ` \u00b7 ${others} dropped by the gates decided` : '');
    $('#progress-bar').style.width = (total ? 100 * done / total : 0) + '%';
  }
  function renderAll() { tiles.forEach(render); progress(); report.applyFilters(); }

  function setAll(rows) {
    decisions = new Map();
    for (const row of rows) decisions.set(keyOf(row.sku, row.candidate), row);
    for (const entry of queue) applyLocal(entry);  // not yet confirmed: still shown as made
    renderAll();
  }
  function applyLocal(entry) {
    const key = keyOf(entry.sku, entry.candidate);
    if (entry.decision === 'undo') decisions.delete(key);
    else decisions.set(key, Object.assign({}, entry, {reviewer: entry.reviewer || reviewer() || 'browser',
                                                      decided_at: entry.decided_at || new Date().toISOString()}));
  }

  // ---- the server (catalog review)
  async function api(method, body) {
    const response = await fetch('/api/decisions', {method, cache: 'no-store',
      headers: body ? {'Content-Type': 'application/json'} : {}, body: body ? JSON.stringify(body) : undefined});
    const payload = await response.json();
    if (!response.ok) {  // 400 / 403: refused for good; 5xx: kept and sent again
      const err = new Error(payload.error || response.statusText);
      err.rejected = response.status === 400 || response.status === 403;
      throw err;
    }
    return payload;
  }
  async function flush() {
    if (sending || !queue.length || mode === 'static') return;
    sending = true;
    const batch = queue.slice(0, 500);
    try {
      const state = await api('POST', {entries: batch.map(e => ({sku: e.sku, candidate: e.candidate,
        decision: e.decision, reason_code: e.reason_code, note: e.note})), reviewer: reviewer() || null});
      queue = queue.slice(batch.length);
      save('pending', queue);
      mode = 'server';
      setAll(state.decisions);
    } catch (err) {
      if (err.rejected) {            // the server refused it: drop it, say why, show the server's truth
        queue = queue.slice(batch.length);
        save('pending', queue);
        toast('Not saved: ' + err.message, true);
        refresh();
      } else {
        mode = 'offline';
        lastError = err.message;
        clearTimeout(retryTimer);
        retryTimer = setTimeout(flush, 3000);
      }
    } finally {
      sending = false;
      showMode();
      if (queue.length && mode === 'server') flush();
    }
  }
  async function refresh() {
    if (mode === 'static' || sending || queue.length) return;
    try {
      const state = await api('GET');
      mode = 'server';
      if (!reviewer() && state.reviewer) reviewerInput.value = state.reviewer;  // catalog review --reviewer
      setAll(state.decisions);
    }
    catch (err) { mode = 'offline'; }
    showMode();
  }

  // ---- making decisions
  function record(entry) {
    const key = keyOf(entry.sku, entry.candidate);
    history.push({key, previous: decisions.has(key) ? Object.assign({}, decisions.get(key)) : null});
    commit(entry);
  }
  function commit(entry) {
    applyLocal(entry);
    if (mode === 'static') {
      save('decisions', Array.from(decisions.values()));
    } else {
      queue.push(entry);
      save('pending', queue);
      flush();
    }
    const el = tiles.get(keyOf(entry.sku, entry.candidate));
    if (el) render(el);
    progress();
    showMode();
  }
  function decide(el, decision, reasonCode, note) {
    const item = el && entryOf.get(el);
    if (!item) return;
    setCurrent(el);
    record({sku: item.sku, candidate: item.candidate, decision, reason_code: reasonCode || null, note: note || null});
    // No automatic move: a decision then j is always the next candidate (the help says so).
    report.applyFilters();  // under a "not reviewed" filter the decided one leaves the list
    toast(decision === 'approve' ? 'Approved' : 'Rejected: ' + REASONS.get(reasonCode));
  }
  function undo() {
    const last = history.pop();
    if (!last) { toast('Nothing to undo'); return; }
    const [sku, candidate] = JSON.parse(last.key);
    const p = last.previous;
    commit(p ? {sku, candidate, decision: p.decision, reason_code: p.reason_code, note: p.note}
             : {sku, candidate, decision: 'undo', reason_code: null, note: null});
    report.applyFilters();
    const el = tiles.get(last.key);
    if (el && !el.hidden) setCurrent(el);
    toast('Undone');
  }

  // ---- focus and keys
  function setCurrent(el) {
    if (current) current.classList.remove('current');
    current = el || null;
    if (!current) return;
    current.classList.add('current');
    current.focus({preventScroll: true});
    current.scrollIntoView({block: 'nearest'});
    if (report.imageOpen()) report.openImage($('a.thumb', current));
  }
  function move(delta) {
    const list = report.visibleCandidates();
    if (!list.length) return;
    const at = list.indexOf(current);
    setCurrent(at < 0 ? list[0] : list[Math.max(0, Math.min(list.length - 1, at + delta))]);
  }
  function ensureCurrent() {
    if (!current || current.hidden || current.closest('.card').hidden) move(0);
    return current;
  }

  const picker = $('#picker'), note = $('#picker-note');
  let pickerFor = null;
  function openPicker(el) {
    if (!el || !entryOf.has(el)) return;
    pickerFor = el;
    note.value = '';
    picker.hidden = false;
    $('.dialog', picker).focus();
  }
  function closePicker() { picker.hidden = true; pickerFor = null; }
  function pick(code) {
    const text = note.value.trim();
    if (code === 'other' && !text) { note.focus(); toast('Type what is wrong, then press Enter'); return; }
    const el = pickerFor;
    closePicker();
    decide(el, 'reject', code, text);
  }
  $('.dialog', picker).tabIndex = -1;
  picker.addEventListener('click', (event) => {
    const button = event.target.closest('button[data-reason]');
    if (button) pick(button.dataset.reason);
    else if (event.target === picker) closePicker();
  });
  note.addEventListener('keydown', (event) => {
    if (event.key !== 'Enter') return;
    event.preventDefault();
    event.stopPropagation();
    if (note.value.trim()) pick('other'); else toast('Pick a reason (1-6), or type a note first');
  });

  const help = $('#help');
  $('#help-button').addEventListener('click', () => { help.hidden = !help.hidden; });
  help.addEventListener('click', () => { help.hidden = true; });

  document.addEventListener('keydown', (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    const key = event.key;
    if (!picker.hidden) {
      if (key === 'Escape') { event.preventDefault(); closePicker(); return; }
      if (event.target === note) return;
      const n = parseInt(key, 10);
      if (n >= 1 && n <= DATA.reasons.length) {
        event.preventDefault();
        const code = DATA.reasons[n - 1][0];
        if (code === 'other' && !note.value.trim()) note.focus(); else pick(code);
      }
      return;
    }
    if (key === 'Escape') { help.hidden = true; report.closeImage(); if (document.activeElement) document.activeElement.blur(); return; }
    const tag = event.target.tagName;
    if (tag === 'INPUT' || tag === 'SELECT' || tag === 'TEXTAREA') return;
    const actions = {
      j: () => move(1), ArrowDown: () => move(1), ArrowRight: () => move(1),
      k: () => move(-1), ArrowUp: () => move(-1), ArrowLeft: () => move(-1),
      a: () => { if (ensureCurrent()) decide(current, 'approve'); },
      r: () => { if (ensureCurrent()) openPicker(current); },
      u: undo,
      o: () => { if (ensureCurrent()) report.openImage($('a.thumb', current)); },
      Enter: () => { if (ensureCurrent()) report.openImage($('a.thumb', current)); },
      '?': () => { help.hidden = !help.hidden; },
    };
    const action = actions[key];
    if (!action) return;
    event.preventDefault();
    if (['j', 'k', 'ArrowDown', 'ArrowRight', 'ArrowUp', 'ArrowLeft'].includes(key) && !current) { move(0); return; }
    action();
  });

  $('#cards').addEventListener('click', (event) => {
    const el = event.target.closest('.cand');
    if (!el || !entryOf.has(el)) return;
    const button = event.target.closest('button[data-act]');
    if (button && button.dataset.act === 'approve') decide(el, 'approve');
    else if (button && button.dataset.act === 'reject') { setCurrent(el); openPicker(el); }
    else setCurrent(el);
  });

  $('#export').addEventListener('click', () => {
    const rows = Array.from(decisions.entries()).filter(([key]) => tiles.has(key)).map(([, row]) => ({
      sku: row.sku, candidate: row.candidate, decision: row.decision, reason_code: row.reason_code || null,
      note: row.note || null, reviewer: row.reviewer || reviewer() || 'browser', decided_at: row.decided_at}));
    const payload = {format: DATA.export_format, version: 1, run: DATA.run, decisions: rows};
    const url = URL.createObjectURL(new Blob([JSON.stringify(payload, null, 1)], {type: 'application/json'}));
    const link = document.createElement('a');
    link.href = url;
    link.download = `decisions-${DATA.run.replace(/[^A-Za-z0-9._-]+/g, '_')}.json`;
    document.body.appendChild(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 1000);
    toast(`Exported ${rows.length} decision(s); apply them with: catalog review ${DATA.run_dir} --import ${link.download}`);
  });

  // ---- start
  if (mode === 'static') {
    setAll(load('decisions', []));
  } else {
    refresh().then(flush);
    setInterval(() => { if (document.visibilityState === 'visible') { if (queue.length) flush(); else refresh(); } }, 10000);
    document.addEventListener('visibilitychange', () => { if (document.visibilityState === 'visible') refresh(); });
  }
  showMode();
  window.catalogReview = {decisions: () => Array.from(decisions.values()), pending: () => queue.length,
                          mode: () => mode};
})();
