// The live page: polls the daemon's JSON (api/analyses, api/events) and redraws.
// Every text that comes from the daemon (analysis ids, process names, command lines)
// is put in the DOM as a text node or a property, never parsed as HTML: a process
// name is whatever its owner made it.
'use strict';

const REFRESH_MS = 2000;
/// The user's open/closed choice per <details>, kept across redraws.
const opened = new Map();
let refreshes = 0;

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (key === 'dataset') {
      Object.assign(node.dataset, value);
    } else {
      node[key] = value;
    }
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
function bytes(n) {
  if (n === null || n === undefined) return '—';
  let value = n;
  let unit = 0;
  while (value >= 1024 && unit < UNITS.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return (unit === 0 ? value : value.toFixed(value < 10 ? 1 : 0)) + ' ' + UNITS[unit];
}

function duration(ms) {
  if (ms === null || ms === undefined) return '—';
  const s = Math.floor(Math.abs(ms) / 1000);
  const [d, h, m, sec] = [Math.floor(s / 86400), Math.floor(s / 3600) % 24,
    Math.floor(s / 60) % 60, s % 60];
  const text = d > 0 ? `${d}d ${h}h` : h > 0 ? `${h}h ${String(m).padStart(2, '0')}m`
    : m > 0 ? `${m}m ${String(sec).padStart(2, '0')}s` : `${sec}s`;
  return ms < 0 ? `-${text}` : text;
}

/// A bar of `value` against `limit` (none: no bar, only the value).
function meter(name, value, limit, format, note) {
  const label = el('div', { className: 'label' },
    el('span', {}, name),
    el('span', {}, limit ? `${format(value)} / ${format(limit)}` : `${format(value)} (no limit)`));
  const fill = el('div', { className: 'fill' });
  const share = limit ? Math.min(1, value / limit) : 0;
  fill.style.width = `${(share * 100).toFixed(1)}%`;
  if (share >= 0.9) fill.classList.add('bad');
  else if (share >= 0.7) fill.classList.add('warn');
  const track = el('div', { className: 'track', title: limit ? `${(share * 100).toFixed(0)}%` : '' }, fill);
  return el('div', { className: 'meter', title: note || '', dataset: { meter: name } }, label, track);
}

const SVG = 'http://www.w3.org/2000/svg';
/// RSS over time as an inline SVG polyline; numbers only go into its attributes.
function sparkline(samples) {
  const svg = document.createElementNS(SVG, 'svg');
  svg.setAttribute('class', 'spark');
  svg.setAttribute('viewBox', '0 0 100 30');
  svg.setAttribute('preserveAspectRatio', 'none');
  svg.dataset.samples = String(samples.length);
  const title = document.createElementNS(SVG, 'title');
  if (samples.length > 0) {
    const peak = Math.max(...samples.map((s) => s[1]));
    title.textContent = `RSS over the last ${samples.length} polls, peak ${bytes(peak)}`;
  } else {
    title.textContent = 'no RSS sample yet (one per poll)';
  }
  svg.append(title);
  if (samples.length < 2) return svg;
  const t0 = samples[0][0];
  const span = Math.max(1, samples[samples.length - 1][0] - t0);
  const peak = Math.max(1, ...samples.map((s) => s[1]));
  const points = samples.map(([t, rss]) =>
    `${((t - t0) / span * 100).toFixed(2)},${(29 - rss / peak * 28).toFixed(2)}`);
  // The area under the line, down to 0 bytes: a flat line at the top is a steady RSS.
  const area = document.createElementNS(SVG, 'polygon');
  area.setAttribute('points', ['0,30', ...points, '100,30'].join(' '));
  const line = document.createElementNS(SVG, 'polyline');
  line.setAttribute('points', points.join(' '));
  svg.append(area, line);
  return svg;
}

/// A <details> whose open state survives redraws (the user's choice, else `byDefault`).
function details(key, byDefault, summary, ...body) {
  const node = el('details', {}, el('summary', {}, ...summary), ...body);
  node.open = opened.has(key) ? opened.get(key) : byDefault;
  node.addEventListener('toggle', () => opened.set(key, node.open));
  return node;
}

function processLabel(row) {
  const parts = [
    el('span', { className: 'pid' }, String(row.pid)), ' ',
    el('span', { className: 'comm' }, row.comm), ' ',
    el('span', { className: 'muted' }, `${bytes(row.rss_bytes)} · ${duration(row.age_ms)}`),
  ];
  if (row.orphan) parts.push(' ', el('span', { className: 'flag' }, 'orphan'));
  if (row.grace_left_ms !== undefined && row.grace_left_ms !== null) {
    parts.push(' ', el('span', { className: 'flag' }, `killing, SIGKILL in ${duration(row.grace_left_ms)}`));
  }
  return el('span', { className: 'proc', dataset: { pid: String(row.pid) } }, ...parts);
}

/// The flat, depth-first rows as nested <details>, built with a stack (no recursion:
/// a chain of processes can be deep).
function processTree(analysis) {
  const root = el('div', { className: 'tree' });
  const containers = [root];
  analysis.tree.forEach((row, i) => {
    containers.length = row.depth + 1;
    const parent = containers[row.depth] || root;
    const next = analysis.tree[i + 1];
    if (next && next.depth > row.depth) {
      const children = el('div', { className: 'children' });
      parent.append(details(`node:${analysis.analysis_id}:${row.pid}`, true, [processLabel(row)], children));
      containers.push(children);
    } else {
      parent.append(el('div', { className: 'leaf' }, processLabel(row)));
    }
  });
  if (analysis.tree_omitted > 0) {
    root.append(el('div', { className: 'more' },
      `${plural(analysis.tree_omitted, 'more process', 'more processes')} not listed`));
  }
  return root;
}

function plural(n, one, many) {
  return `${n} ${n === 1 ? one : many}`;
}

function timeLeft(a) {
  if (a.deadline_in_ms < 0) return `overdue by ${duration(-a.deadline_in_ms)}`;
  return `${duration(a.deadline_in_ms)} left`;
}

function analysisCard(a, owners) {
  const owner = owners[String(a.owner_uid)];
  const zombies = a.zombies === undefined || a.zombies === null ? '—' : String(a.zombies);
  const head = el('div', { className: 'head' },
    el('span', { className: 'id' }, a.analysis_id),
    el('span', { className: 'muted owner' }, owner ? `${owner} (uid ${a.owner_uid})` : `uid ${a.owner_uid}`),
    el('span', { className: 'muted age' }, `running ${duration(a.age_ms)}`),
    el('span', { className: 'muted left' }, `${timeLeft(a)} of ${duration(a.limits.timeout_ms)}`),
    a.dying ? el('span', { className: 'badge' }, `being killed: ${a.dying}`) : null);
  const maxProcs = a.limits.max_processes || null;
  const counts = el('div', { className: 'counts' },
    el('span', { className: 'processes' }, plural(a.processes, 'process', 'processes')),
    maxProcs ? el('span', { className: 'muted' }, ` (at most ${maxProcs})`) : null,
    ' · ',
    el('span', { className: 'zombies' }, zombies === '1' ? '1 zombie' : `${zombies} zombies`));
  const grid = el('div', { className: 'grid' },
    meter('largest process RSS', a.largest_rss_bytes, a.limits.memory_bytes, bytes),
    // The sum counts a page shared by N processes N times; the tree limit does not.
    meter('tree RSS', a.rss_bytes, a.limits.tree_memory_bytes, bytes,
      'RSS summed over the processes. The tree limit counts a shared page once (PSS), so this sum may pass it without a kill.'),
    el('div', {}, el('div', { className: 'muted' }, `tree RSS, last ${plural(a.rss_samples.length, 'poll', 'polls')}`),
      sparkline(a.rss_samples)));
  const tree = details(`tree:${a.analysis_id}`, false,
    [`process tree (${a.processes})`], processTree(a));
  const card = el('article', { className: 'analysis', dataset: { analysisId: a.analysis_id } },
    head, counts, grid, tree);
  if (a.dying) card.classList.add('dying');
  return card;
}

function limitText(record) {
  if (record.limit === null || record.limit === undefined) return '—';
  switch (record.reason) {
    case 'timeout': return duration(record.limit);
    case 'memory':
    case 'tree_memory': return bytes(record.limit);
    case 'warning': return limitText({ ...record, reason: record.warned_of });
    default: return String(record.limit);
  }
}

function eventRow(r) {
  const signals = (r.signals || []).map((s) => `${s.signal} ${s.at.slice(11, 23)}`).join(', ');
  const row = el('tr', { dataset: { reason: r.reason, analysisId: r.analysis_id } },
    el('td', {}, r.time.replace('T', ' ').replace('Z', '')),
    el('td', { className: 'aid' }, r.analysis_id),
    el('td', {}, String(r.pid)),
    el('td', {}, r.comm),
    el('td', { className: 'reason' }, r.reason),
    el('td', {}, limitText(r)),
    el('td', {}, bytes(r.rss_bytes)),
    el('td', {}, duration(r.runtime_ms)),
    el('td', {}, r.spooled ? `${r.outcome} (spooled)` : r.outcome),
    el('td', {}, signals || '—'),
    el('td', { className: 'cmd', title: r.cmdline }, r.cmdline.length > 200 ? `${r.cmdline.slice(0, 200)}…` : r.cmdline));
  // Not in the database yet: the database is down or the write is in flight.
  if (r.spooled) row.classList.add('spooled');
  return row;
}

function showAnalyses(data) {
  const list = document.getElementById('analyses');
  list.replaceChildren(...data.analyses.map((a) => analysisCard(a, data.owners || {})));
  document.getElementById('no-analyses').hidden = data.analyses.length > 0;
  document.getElementById('summary').textContent =
    `${plural(data.watched, 'process', 'processes')} watched in ${plural(data.analyses.length, 'analysis', 'analyses')}`;
}

function showEvents(data) {
  document.getElementById('event-rows').replaceChildren(...data.records.map(eventRow));
  document.getElementById('events').hidden = data.records.length === 0;
  document.getElementById('no-events').hidden = data.records.length > 0;
  const more = document.getElementById('events-more');
  more.hidden = !data.more;
  more.textContent = `Older records are not shown: watchdog-user events lists them.`;
  const down = document.getElementById('events-database');
  down.hidden = !data.database_error;
  down.textContent = data.database_error
    ? `The database cannot be read (${data.database_error}): only records still in the spool are shown.`
    : '';
}

// The token the page's JSON asks for comes in the address' fragment (#token=TOKEN),
// which the browser never sends; it is kept for this tab only, and taken out of the
// address so that it stays out of history and screenshots.
const TOKEN_KEY = 'watchdog-token';

function token() {
  const given = new URLSearchParams(location.hash.slice(1)).get('token');
  if (given) {
    sessionStorage.setItem(TOKEN_KEY, given);
    history.replaceState(null, '', location.pathname + location.search);
  }
  return sessionStorage.getItem(TOKEN_KEY) || '';
}

async function fetchJson(path) {
  const response = await fetch(path, {
    cache: 'no-store',
    headers: { Authorization: `Bearer ${token()}` },
  });
  if (response.status === 401) {
    throw new Error(`this page needs the daemon's token: open it as ${location.origin}/#token=TOKEN (${await response.text()})`);
  }
  if (!response.ok) {
    throw new Error(`${path}: ${response.status} ${await response.text()}`);
  }
  return response.json();
}

function showError(errors) {
  const box = document.getElementById('error');
  box.hidden = errors.length === 0;
  box.textContent = errors.join('; ');
}

async function refresh() {
  const [analyses, events] = await Promise.allSettled([
    fetchJson('api/analyses'), fetchJson('api/events')]);
  const errors = [];
  if (analyses.status === 'fulfilled') showAnalyses(analyses.value);
  else errors.push(`analyses: ${analyses.reason.message}`);
  if (events.status === 'fulfilled') showEvents(events.value);
  else errors.push(`kills: ${events.reason.message}`);
  showError(errors);
  refreshes += 1;
  document.body.dataset.refreshes = String(refreshes);
  document.getElementById('updated').textContent = `updated ${new Date().toLocaleTimeString()}`;
}

async function loop() {
  try {
    await refresh();
  } catch (err) {
    showError([String(err)]);
  }
  setTimeout(loop, REFRESH_MS);
}

loop();
