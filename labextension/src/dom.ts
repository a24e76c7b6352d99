// A tiny element builder: the panel is plain DOM, and text goes in as text (never as HTML).

type Child = Node | string | null | undefined | false;

export function h(
  tag: string,
  attrs: Record<string, string | number | boolean | null | undefined> = {},
  ...children: Child[]
): HTMLElement {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) {
      continue;
    }
    el.setAttribute(key, value === true ? '' : String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined || child === false) {
      continue;
    }
    el.append(typeof child === 'string' ? document.createTextNode(child) : child);
  }
  return el;
}

/** The label every simulated GPU carries, wherever it is shown. */
export function simulatedBadge(): HTMLElement {
  return h(
    'span',
    {
      class: 'bf-badge bf-badge-simulated',
      'data-testid': 'bf-simulated',
      title: 'A simulated GPU of a gateway started with --simulate-gpus: no real GPU is used.'
    },
    'SIMULATED'
  );
}

/** What a server says of its shares' sandbox, shown only when they are NOT sandboxed. */
export function sandboxBadge(
  sandbox: { sandboxed: boolean; refused: boolean; line: string } | null
): HTMLElement | null {
  if (!sandbox || sandbox.sandboxed) {
    return null;
  }
  return h(
    'span',
    { class: 'bf-badge bf-badge-unconfined', 'data-testid': 'bf-unconfined', title: sandbox.line },
    sandbox.refused ? 'SHARES REFUSED' : 'UNCONFINED'
  );
}

/** A horizontal bar of segments, each a share of `total`. */
export function bar(
  total: number,
  segments: { value: number; cls: string; title: string }[],
  testid: string
): HTMLElement {
  const el = h('div', { class: 'bf-bar', 'data-testid': testid });
  for (const seg of segments) {
    const pct = total > 0 ? Math.max(0, Math.min(100, (seg.value / total) * 100)) : 0;
    const part = h('span', { class: `bf-bar-seg ${seg.cls}`, title: seg.title });
    part.style.width = `${pct}%`;
    el.append(part);
  }
  return el;
}
