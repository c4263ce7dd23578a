// diffqueue's pages. The jobs list and the job page render from the JSON API and poll it,
// so they update themselves; buttons post with the page's CSRF token. No build step.
'use strict';

const FINISHED = new Set(['succeeded', 'failed', 'cancelled']);
const RETRYABLE = new Set(['failed', 'cancelled']);

// ------------------------------------------------------------------ helpers
function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === 'text') node.textContent = value;
    else node.setAttribute(key, value === true ? '' : value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return '';
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

const secondsBetween = (from, to) => ((to ? Date.parse(to) : Date.now()) - Date.parse(from)) / 1000;

function humanBytes(n) {
  const units = ['bytes', 'KiB', 'MiB', 'GiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return i ? `${n.toFixed(1)} ${units[i]}` : `${n} bytes`;
}

function flash(message) {
  const box = document.getElementById('flash');
  box.textContent = message;
  box.hidden = !message;
}

function progressText(job) {
  const p = job.progress;
  const parts = [];
  if (p.total) parts.push(`${p.step}/${p.total}`);
  if (p.eta_s !== null && p.eta_s !== undefined) parts.push(`ETA ${duration(p.eta_s)}`);
  return parts.join(' · ');
}

function setProgress(bar, job) {
  const p = job.progress;
  bar.max = p.total || 1;
  bar.value = p.total ? p.step : (job.status === 'succeeded' ? 1 : 0);
}

async function postAction(url) {
  const resp = await fetch(url, {
    method: 'POST',
    headers: { 'X-CSRFToken': document.querySelector('meta[name="csrf-token"]').content, Accept: 'application/json' },
  });
  const body = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new Error(body.message || `${url}: HTTP ${resp.status}`);
  return body;
}

// Calls `tick` again after the delay (ms) it returns, until it returns null. A failed
// fetch (the server restarting) is retried after `retryMs`.
function poller(tick, retryMs = 3000) {
  let pending = null;
  const run = async () => {
    let next = retryMs;
    try { next = await tick(); } catch (err) { console.warn('poll failed:', err); }
    pending = next === null ? null : setTimeout(run, next);
  };
  return { start() { if (pending === null) pending = setTimeout(run, 0); } };
}

// ------------------------------------------------------------------ jobs list
function jobsList(table) {
  const tbody = table.tBodies[0];
  const pageUrl = (id) => table.dataset.jobUrl.replace('JOB', id);
  const query = new URLSearchParams({ limit: table.dataset.limit, offset: table.dataset.offset });
  if (table.dataset.status) query.set('status', table.dataset.status);
  if (table.dataset.kind) query.set('kind', table.dataset.kind);

  function actionButtons(job) {
    const buttons = [];
    const add = (label, action, cls) => {
      const button = h('button', { type: 'button', class: cls, 'data-action': action,
        'aria-label': `${label} job ${job.id.slice(0, 8)}`, text: label });
      button.addEventListener('click', async () => {
        button.disabled = true;
        try { render([await postAction(`${pageUrl(job.id)}/${action}`)], true); flash(''); } catch (err) { flash(err.message); }
        poll.start();
      });
      buttons.push(button);
    };
    if (!FINISHED.has(job.status) && !job.cancel_requested) add('Cancel', 'cancel', 'danger');
    if (RETRYABLE.has(job.status)) add('Retry', 'retry', '');
    return buttons;
  }

  function newRow(job) {
    return h('tr', { 'data-id': job.id },
      h('td', { 'data-label': 'Job' }, h('a', { href: pageUrl(job.id) }, h('code', { text: job.id.slice(0, 8) }))),
      h('td', { 'data-label': 'Kind', text: job.kind }),
      h('td', { 'data-label': 'Status' }, h('span', { class: 'status' })),
      h('td', { 'data-label': 'Progress' },
        h('progress', { 'aria-label': `progress of job ${job.id.slice(0, 8)}` }), h('small', { class: 'progress-text' })),
      h('td', { 'data-label': 'Age' }, h('time', { datetime: job.created_at, title: job.created_at })),
      h('td', { class: 'row-actions' }));
  }

  function updateRow(row, job) {
    const status = row.querySelector('.status');
    const shown = job.cancel_requested && !FINISHED.has(job.status) ? 'cancelling' : job.status;
    status.textContent = shown;
    status.className = `status ${job.status}`;
    setProgress(row.querySelector('progress'), job);
    row.querySelector('.progress-text').textContent = progressText(job);
    row.querySelector('time').textContent = `${duration(secondsBetween(job.created_at))} ago`;
    if (row.dataset.shown !== shown) {  // rebuilt only on a change, so keyboard focus stays put
      row.dataset.shown = shown;
      row.querySelector('.row-actions').replaceChildren(...actionButtons(job));
    }
  }

  // `onlyUpdate`: one job's new state (after a button), without touching the other rows.
  function render(list, onlyUpdate = false) {
    let previous = null;
    const seen = new Set();
    for (const job of list) {
      seen.add(job.id);
      let row = tbody.querySelector(`tr[data-id="${job.id}"]`);
      if (onlyUpdate) { if (row) updateRow(row, job); continue; }
      row = row || newRow(job);
      updateRow(row, job);
      const wanted = previous ? previous.nextSibling : tbody.firstChild;
      if (wanted !== row) tbody.insertBefore(row, wanted);  // newest first, as the API orders them
      previous = row;
    }
    if (onlyUpdate) return;
    for (const row of [...tbody.rows]) if (!seen.has(row.dataset.id)) row.remove();
    document.getElementById('empty').hidden = list.length > 0;
  }

  const poll = poller(async () => {
    const resp = await fetch(`${table.dataset.api}?${query}`, { headers: { Accept: 'application/json' } });
    const body = await resp.json();
    render(body.jobs);
    document.getElementById('total').textContent = body.total;
    // Quick while something runs; slower when idle, still showing newly submitted jobs.
    return body.jobs.some((j) => !FINISHED.has(j.status)) ? 1000 : 4000;
  });
  render(JSON.parse(document.getElementById('jobs-data').textContent));
  for (const select of document.querySelectorAll('#filters select')) {
    select.addEventListener('change', () => select.form.requestSubmit());
  }
  poll.start();
}

// ------------------------------------------------------------------ job page
const FIGURE_ALT = {
  'loss.png': 'Training loss per step',
  'samples.png': 'Sample grid from the final model',
  'grid.png': 'Grid of every image the job made',
};

function describe(artifact) {
  const step = artifact.name.match(/^samples\/step-0*(\d+)\.png$/);
  if (step) return `Sample grid at training step ${step[1]}`;
  return FIGURE_ALT[artifact.name] || artifact.name;
}

const hiddenFromGallery = (name) => /^(previews|model|checkpoints)\//.test(name) || name === 'preview.png';

function jobPage(root) {
  let job = JSON.parse(document.getElementById('job-data').textContent);
  let shownArtifacts = null;
  const $ = (id) => document.getElementById(id);
  const lightbox = $('lightbox');

  function enlarge(artifact, src) {
    $('lightbox-img').src = src;
    $('lightbox-img').alt = describe(artifact);
    $('lightbox-img').classList.toggle('pixels', /^(samples|images)\//.test(artifact.name));
    $('lightbox-caption').textContent = artifact.name;
    $('lightbox-link').href = artifact.url;
    const variation = $('lightbox-variation');
    variation.hidden = !(job.kind.startsWith('sd.') && artifact.name.startsWith('images/'));
    variation.href = root.dataset.variationUrl.replace('INIT', encodeURIComponent(`job:${job.id}/${artifact.name}`));
    lightbox.showModal();
  }

  function figure(artifact) {
    const src = `${artifact.url}?v=${artifact.sha256.slice(0, 8)}`;  // a rewritten file gets a new URL
    const caption = artifact.name.replace(/^(samples|images)\//, '');
    const link = h('a', { href: artifact.url, class: 'enlarge', 'aria-label': `Enlarge ${describe(artifact)}` },
      h('img', { src, alt: describe(artifact), loading: 'lazy', 'data-name': artifact.name }));
    link.addEventListener('click', (event) => { event.preventDefault(); enlarge(artifact, src); });
    return h('figure', {}, link, h('figcaption', { text: caption }));
  }

  function renderArtifacts() {
    const key = job.artifacts.map((a) => a.name + a.sha256).join();
    if (key === shownArtifacts) return;  // unchanged: keep the images as they are, no flicker
    shownArtifacts = key;
    const groups = { figures: [], samples: [], images: [] };
    const downloads = [];
    const checkpoints = [];
    let hasModel = false;
    for (const a of job.artifacts) {
      if (a.name.startsWith('model/')) { hasModel = true; continue; }
      if (a.name.startsWith('checkpoints/')) { checkpoints.push(a); continue; }
      if (hiddenFromGallery(a.name)) continue;
      const group = !a.content_type.startsWith('image/') ? null
        : a.name.startsWith('samples/') ? 'samples' : a.name.startsWith('images/') ? 'images' : 'figures';
      if (group) groups[group].push(figure(a));
      // Images and per-checkpoint grids open from their gallery; the list keeps to the rest.
      if (group !== 'images' && group !== 'samples') downloads.push(a);
    }
    for (const [group, figures] of Object.entries(groups)) {
      $(group).replaceChildren(...figures);
      $(`${group}-section`).hidden = figures.length === 0;
    }
    const item = (a) => h('li', {}, h('a', { href: a.url, download: a.name.split('/').pop(), text: a.name }),
      ' ', h('small', { text: humanBytes(a.size) }));
    $('downloads').replaceChildren(...downloads.map(item));
    $('checkpoints').replaceChildren(...checkpoints.map(item));
    $('checkpoints-box').hidden = checkpoints.length === 0;
    const archives = [];
    const archive = (id, prefix, text) => h('a', { class: 'button', id, href: `${root.dataset.archive}?prefix=${prefix}`, text });
    if (hasModel) archives.push(archive('model-zip', 'model/', 'Model folder (.zip)'));
    const card = job.artifacts.find((a) => a.name === 'model/README.md');
    if (card) archives.push(h('a', { class: 'button', id: 'model-card', href: card.url, text: 'Model card (how to sample it)' }));
    if (groups.images.length) archives.push(archive('images-zip', 'images/', `${groups.images.length} images (.zip)`));
    if (job.artifacts.length) archives.push(archive('all-zip', '', 'Everything (.zip)'));
    $('archives').replaceChildren(...archives);
    $('sample-model').hidden = !(job.kind === 'ddpm.train' && job.status === 'succeeded' && hasModel);
  }

  function renderTimings() {
    const rows = [['Created', `${new Date(job.created_at).toLocaleString()} (${duration(secondsBetween(job.created_at))} ago)`]];
    if (job.started_at) rows.push(['Waited', duration(secondsBetween(job.created_at, job.started_at))]);
    else if (!FINISHED.has(job.status)) rows.push(['Waiting', duration(secondsBetween(job.created_at))]);
    if (job.started_at) rows.push([job.finished_at ? 'Ran' : 'Running', duration(secondsBetween(job.started_at, job.finished_at))]);
    if (job.finished_at) rows.push(['Finished', new Date(job.finished_at).toLocaleString()]);
    $('timings').replaceChildren(...rows.flatMap(([term, value]) => [h('dt', { text: term }), h('dd', { text: value })]));
  }

  function render() {
    const cancelling = job.cancel_requested && !FINISHED.has(job.status);
    $('status').textContent = cancelling ? 'cancelling' : job.status;
    $('status').className = `status ${job.status}`;
    $('attempt').textContent = job.attempt;
    $('worker').textContent = job.worker ? `on ${job.worker}` : '';
    setProgress($('bar'), job);
    const counts = progressText(job);
    // Messages such as "step 40/90 loss 0.0612" already carry the count: show it once.
    const extra = job.progress.total && (job.progress.message || '').includes(`${job.progress.step}/${job.progress.total}`)
      ? counts.replace(/^\d+\/\d+( · )?/, '') : counts;
    $('message').textContent = [job.progress.message, extra].filter(Boolean).join(' · ');
    $('error-box').hidden = !job.error;
    $('error').textContent = job.error || '';
    $('traceback').textContent = job.traceback || '';
    $('traceback').parentElement.hidden = !job.traceback;
    const preview = job.progress.preview;
    $('preview-box').hidden = !preview;
    if (preview && $('preview').dataset.name !== preview.name) {
      $('preview').dataset.name = preview.name;
      $('preview').src = preview.url;
      const step = preview.name.match(/step-0*(\d+)/);
      const what = job.kind === 'ddpm.sample' ? 'current x (left) beside the predicted x0 (right)' : 'the latents, roughly mapped to colours';
      $('preview').alt = `Preview ${step ? `at step ${step[1]}` : ''}: ${what}`;
      $('preview-caption').textContent = `Latest preview${step ? `, step ${step[1]}` : ''}: ${what}`;
    }
    $('cancel-form').hidden = FINISHED.has(job.status) || job.cancel_requested;
    $('retry-form').hidden = !RETRYABLE.has(job.status);
    $('pin-form').hidden = job.pinned;
    $('unpin-form').hidden = !job.pinned;
    $('retention').textContent = job.pinned ? 'pinned: kept'
      : job.expires_at ? `kept until ${new Date(job.expires_at).toLocaleString()}` : '';
    renderTimings();
    renderArtifacts();
  }

  // The result table is the server's (job.html): fetched again when a job finishes with
  // a result other than the one the page was rendered with.
  let shownResult = JSON.stringify(job.result);
  async function refreshResult() {
    const resp = await fetch(window.location.href, { headers: { Accept: 'text/html' } });
    const fresh = new DOMParser().parseFromString(await resp.text(), 'text/html').getElementById('result-section');
    if (fresh) $('result-section').replaceWith(fresh);
  }

  const poll = poller(async () => {
    job = await (await fetch(root.dataset.api, { headers: { Accept: 'application/json' } })).json();
    render();
    if (!FINISHED.has(job.status)) return 1000;
    const result = JSON.stringify(job.result);
    if (result !== shownResult) { await refreshResult(); shownResult = result; }
    return null;
  });
  for (const form of root.querySelectorAll('form[data-action]')) {
    form.addEventListener('submit', async (event) => {
      event.preventDefault();
      try { job = await postAction(form.action); flash(''); render(); } catch (err) { flash(err.message); }
      poll.start();
    });
  }
  lightbox.addEventListener('click', (event) => { if (event.target === lightbox) lightbox.close(); });
  render();
  if (!FINISHED.has(job.status)) poll.start();
}

// ------------------------------------------------------------------ submit form
function submitForm(form) {
  const presets = JSON.parse(document.getElementById('presets').textContent);
  const select = form.querySelector('#f-preset');
  if (!select) return;
  // Choosing a preset fills in its values; the user's edits to other fields stay.
  select.addEventListener('change', () => {
    const params = (presets[select.value] || {}).params || {};
    for (const [name, value] of Object.entries(params)) {
      const input = form.elements.namedItem(name);
      if (!input || !input.dataset) continue;
      const widget = input.dataset.widget;
      if (widget === 'checkbox') input.checked = Boolean(value);
      else if (value === null || value === undefined) input.value = '';
      else if (widget === 'json') input.value = JSON.stringify(value);
      else if (typeof value === 'boolean') input.value = value ? 'True' : 'False';  // a select's options
      else if (Array.isArray(value)) input.value = value.join(widget === 'lines' ? '\n' : ', ');
      else input.value = value;
    }
  });
}

// Forms that destroy something ask first.
for (const confirmed of document.querySelectorAll('form[data-confirm]')) {
  confirmed.addEventListener('submit', (event) => { if (!window.confirm(confirmed.dataset.confirm)) event.preventDefault(); });
}

const jobsTable = document.getElementById('jobs');
if (jobsTable) jobsList(jobsTable);
const jobRoot = document.getElementById('job');
if (jobRoot) jobPage(jobRoot);
const form = document.getElementById('submit-form');
if (form) submitForm(form);
