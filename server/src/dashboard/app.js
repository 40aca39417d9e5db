// Tether KBS dashboard: refreshes the server-rendered page from the admin APIs (with the
// HttpOnly session cookie; state-changing calls add the X-Tether-Dashboard header), and
// follows running rollouts over server-sent events. No dependencies, no innerHTML of data.
'use strict';

const REFRESH_MS = 2000;
const streams = new Map();

async function api(method, path, body) {
  const headers = { 'x-tether-dashboard': '1' };
  if (body !== undefined) headers['content-type'] = 'application/json';
  const resp = await fetch(path, {
    method,
    headers,
    credentials: 'same-origin',
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (resp.status === 401) {
    window.location.assign('/dashboard');
    throw new Error('session expired');
  }
  const json = await resp.json().catch(() => null);
  if (!resp.ok) {
    throw new Error((json && json.detail) || `${method} ${path}: ${resp.status}`);
  }
  return json;
}

function cell(text, cls) {
  const td = document.createElement('td');
  td.textContent = text === undefined || text === null ? '' : String(text);
  if (cls) td.className = cls;
  return td;
}

function time(ms) {
  return ms ? new Date(ms).toISOString().replace('T', ' ').slice(0, 19) : '';
}

function pairs(obj, sep) {
  return Object.entries(obj || {}).map(([k, v]) => `${k}${sep}${v}`).join(', ');
}

function body(tableId) {
  return document.querySelector(`#${tableId} tbody`);
}

async function refreshGuests() {
  const v = await api('GET', '/kbs/v0/admin/guests?connected=any&limit=500');
  const tb = body('guests');
  const rows = [];
  let connected = 0;
  for (const g of v.guests) {
    if (g.connected) connected += 1;
    const tr = document.createElement('tr');
    tr.dataset.guestId = g.guest_id;
    tr.className = g.connected ? 'connected' : 'disconnected';
    const reason = g.history && g.history[0] && g.history[0].reason;
    const state = g.connected ? 'connected' : `disconnected${reason ? ` (${reason})` : ''}`;
    const held = Object.entries(g.held || {}).map(([p, h]) => `${p}@v${h.version}`).join(', ');
    const probe = g.last_probe ? `${g.last_probe.outcome} ${time(g.last_probe.at)}` : '';
    tr.append(
      cell(g.guest_id, 'id'),
      cell(state, 'state'),
      cell(pairs(g.labels, '=')),
      cell(g.tee),
      cell(held, 'held'),
      cell(probe),
      cell(time(g.last_seen)),
    );
    rows.push(tr);
  }
  tb.replaceChildren(...rows);
  document.getElementById('guest-count').textContent =
    `${connected} connected, ${v.known} known (kept ${v.forget_after} after last seen)`;
}

function total(counts) {
  return Object.values(counts || {}).reduce((a, b) => a + b, 0);
}

function renderProgress(td, counts) {
  const n = total(counts);
  const acked = (counts && counts.acked) || 0;
  const failed = ((counts && counts.failed) || 0) + ((counts && counts.denied) || 0);
  const pct = n === 0 ? 0 : Math.floor((100 * acked) / n);
  const bar = document.createElement('progress');
  bar.max = Math.max(n, 1);
  bar.value = acked;
  const label = document.createElement('span');
  label.className = 'pct';
  label.textContent = `${pct} %`;
  const detail = document.createElement('small');
  detail.textContent = ` ${acked}/${n} acked${failed ? `, ${failed} failed` : ''}`;
  td.replaceChildren(bar, label, detail);
}

function updateRollout(id, state, counts) {
  const tr = document.getElementById(`rollout-${id}`);
  if (!tr) return;
  tr.querySelector('.state').textContent = state;
  renderProgress(tr.querySelector('.progress'), counts);
}

function follow(id) {
  if (streams.has(id)) return;
  const es = new EventSource(`/kbs/v0/rotation/rollouts/${id}/events`);
  streams.set(id, es);
  const onData = (e) => {
    const d = JSON.parse(e.data);
    updateRollout(id, d.state, d.counts);
  };
  es.addEventListener('snapshot', onData);
  es.addEventListener('change', onData);
  es.onerror = () => {
    es.close();
    streams.delete(id);
  };
}

async function refreshRollouts() {
  const err = document.getElementById('rollout-error');
  let v;
  try {
    v = await api('GET', '/kbs/v0/rotation/rollouts');
  } catch (e) {
    err.textContent = `rollouts unavailable: ${e.message}`;
    return;
  }
  const tb = body('rollouts');
  const rows = [];
  for (const r of v.rollouts) {
    const tr = document.createElement('tr');
    tr.id = `rollout-${r.id}`;
    tr.append(
      cell(r.id),
      cell(r.path),
      cell(r.version),
      cell(r.selector || '(all)'),
      cell(r.state, 'state'),
      cell('', 'progress'),
    );
    renderProgress(tr.querySelector('.progress'), r.counts);
    rows.push(tr);
    if (!r.done) follow(r.id);
  }
  tb.replaceChildren(...rows);
}

async function refreshPlugins() {
  const v = await api('GET', '/kbs/v0/plugin');
  const rows = v.plugins.map((p) => {
    const tr = document.createElement('tr');
    tr.dataset.plugin = p.name;
    const button = document.createElement('button');
    button.id = `plugin-toggle-${p.name}`;
    button.textContent = p.enabled ? 'Disable' : 'Enable';
    button.addEventListener('click', async () => {
      const err = document.getElementById('plugin-error');
      err.textContent = '';
      try {
        await api('POST', `/kbs/v0/plugin/${p.enabled ? 'disable' : 'enable'}/${p.name}`);
      } catch (e) {
        err.textContent = e.message;
      }
      await refreshPlugins();
    });
    const action = document.createElement('td');
    action.append(button);
    tr.append(
      cell(p.name),
      cell(p.kind),
      cell(p.version),
      cell(p.enabled ? 'enabled' : 'disabled', 'state'),
      action,
    );
    return tr;
  });
  body('plugins').replaceChildren(...rows);
}

function fromBase64Url(s) {
  const b64 = s.replace(/-/g, '+').replace(/_/g, '/');
  const bin = atob(b64 + '='.repeat((4 - (b64.length % 4)) % 4));
  return new TextDecoder().decode(Uint8Array.from(bin, (c) => c.charCodeAt(0)));
}

async function refreshPolicy() {
  const v = await api('GET', '/kbs/v0/resource-policy');
  const text = fromBase64Url(v.policy);
  const pre = document.getElementById('policy');
  if (pre.textContent !== text) pre.textContent = text;
  document.getElementById('policy-version').textContent = `version ${v.version}`;
}

async function refreshEvents() {
  const v = await api('GET', '/kbs/v0/admin/events?limit=30');
  const rows = v.events.map((e) => {
    const tr = document.createElement('tr');
    tr.className = `event-${e.kind}`;
    tr.append(
      cell(time(e.at)),
      cell(e.kind),
      cell(e.action),
      cell(e.guest_id),
      cell(e.actor),
      cell(e.target),
      cell(e.outcome),
      cell(e.detail),
    );
    return tr;
  });
  body('events').replaceChildren(...rows);
}

let tick = 0;
async function refresh() {
  const jobs = [refreshGuests(), refreshRollouts(), refreshEvents()];
  if (tick % 5 === 0) jobs.push(refreshPlugins(), refreshPolicy());
  tick += 1;
  const results = await Promise.allSettled(jobs);
  document.body.dataset.refreshed = String(tick);
  for (const r of results) {
    if (r.status === 'rejected') console.warn(r.reason);
  }
}

document.getElementById('rollout-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  const err = document.getElementById('rollout-error');
  err.textContent = '';
  try {
    await api('POST', '/kbs/v0/rotation/rollouts', {
      path: document.getElementById('rollout-path').value.trim(),
      selector: document.getElementById('rollout-selector').value.trim(),
    });
  } catch (ex) {
    err.textContent = ex.message;
  }
  await refreshRollouts();
});

refresh();
setInterval(refresh, REFRESH_MS);
