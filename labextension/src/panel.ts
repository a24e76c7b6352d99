// The "GPU pool" sidebar panel: the pool, this server's kernels and their shares, and a form
// to start a notebook on a share. Sections are redrawn only when their data changed, so a
// once-a-second push does not fight the user's clicks and typing.

import { Widget } from '@lumino/widgets';

import {
  IKernel,
  IPool,
  IPoolGpu,
  IPoolServer,
  IPreset,
  IShareRequest,
  LiveFeed,
  request,
  shareSize
} from './api';
import { bar, h, sandboxBadge, simulatedBadge } from './dom';
import { IPoliceNotice } from './notices';

/** What the panel needs from JupyterLab, kept narrow so the panel stays plain DOM. */
export interface IPanelHost {
  /** The display name of a kernelspec (its name when unknown). */
  displayName(kernelspec: string): string;
  /** Refresh the kernelspecs, then create and open a notebook with this kernel. */
  openNotebook(kernelspec: string): Promise<void>;
  /** Tell JupyterLab's session list that kernels changed. */
  kernelsChanged(): Promise<void>;
}

const STATE_SENTENCES: Record<string, (address: string) => string> = {
  unreachable: a => `The gateway at ${a} does not answer; check that it runs and the address is right.`,
  unauthorized: a =>
    `The gateway at ${a} refused your token; run \`bitfusion init --token TOKEN --server ${a}\` with a token of its pool.`,
  error: a => `The gateway at ${a} answered with an error.`
};

function serverSentence(server: IPoolServer): string {
  // The server extension's own sentence says most (it knows the cause); ours is the fallback.
  return server.error || (STATE_SENTENCES[server.state] ?? STATE_SENTENCES.error)(server.address);
}

function mib(n: number | null | undefined): string {
  return n === null || n === undefined ? '?' : `${Math.round(n)}`;
}

export class GpuPanel extends Widget {
  constructor(feed: LiveFeed, host: IPanelHost) {
    super();
    this._feed = feed;
    this._host = host;
    this.id = 'bitfusion-gpu-pool';
    this.addClass('bf-Panel');
    this.title.caption = 'GPU pool';

    this._feedState = h('span', { class: 'bf-feed', 'data-testid': 'bf-feed' });
    this._error = h('p', { class: 'bf-error', 'data-testid': 'bf-error', hidden: true });
    this._notice = h('p', { class: 'bf-notice', 'data-testid': 'bf-notice', hidden: true });
    this._pool = h('section', { class: 'bf-section', 'data-testid': 'bf-pool' });
    this._kernels = h('div', { 'data-testid': 'bf-kernels' });
    this._presets = h('div', { class: 'bf-presets', 'data-testid': 'bf-presets' });
    this.node.append(
      h('header', { class: 'bf-header' }, h('h2', {}, 'GPU pool'), this._feedState),
      this._error,
      this._notice,
      this._pool,
      h('section', { class: 'bf-section' }, h('h3', {}, 'My kernels'), this._kernels),
      this._startForm()
    );
    feed.changed.connect(this._render, this);
    this._render();
    void this.loadPresets();
  }

  /** Ask for the installed bitfusion kernelspecs again (after one was added). */
  async loadPresets(): Promise<void> {
    try {
      const { presets } = await request<{ presets: IPreset[] }>('presets');
      this._renderPresets(presets);
    } catch (error) {
      this._say((error as Error).message, true);
    }
  }

  dispose(): void {
    this._feed.changed.disconnect(this._render, this);
    super.dispose();
  }

  private _render(): void {
    const feed = this._feed;
    this._feedState.textContent =
      feed.state === 'live' ? '● live' : feed.state === 'polling' ? '○ polling every 2 s' : '';
    this._feedState.dataset.state = feed.state;
    this._error.textContent = feed.error ?? '';
    this._error.hidden = !feed.error;
    const data = feed.data;
    this._redraw(this._pool, 'pool', data?.pool ?? null, pool => this._renderPool(pool));
    this._redraw(this._kernels, 'kernels', data ? data.kernels.kernels : null, kernels =>
      this._renderKernels(kernels)
    );
  }

  /** Replace `el`'s children with `draw(value)` when `value` differs from the last drawn. */
  private _redraw<T>(el: HTMLElement, key: string, value: T | null, draw: (v: T) => Node[]): void {
    const stamp = JSON.stringify([value, [...this._stopping]]);
    if (this._stamps.get(key) === stamp) {
      return;
    }
    this._stamps.set(key, stamp);
    el.replaceChildren(
      ...(value === null ? [h('p', { class: 'bf-dim' }, 'Asking the GPU servers…')] : draw(value))
    );
  }

  private _renderPool(pool: IPool): Node[] {
    if (!pool.configured) {
      return [
        h(
          'p',
          { class: 'bf-state', 'data-testid': 'bf-message', 'data-state': 'unconfigured' },
          pool.message ||
            'No GPU servers are configured: run `bitfusion init --token TOKEN --server HOST:PORT`.'
        )
      ];
    }
    return pool.servers.map(server => this._renderServer(server));
  }

  private _renderServer(server: IPoolServer): HTMLElement {
    const name = server.hostname || server.address;
    return h(
      'div',
      {
        class: 'bf-server',
        'data-testid': 'bf-server',
        'data-address': server.address,
        'data-state': server.state
      },
      h(
        'div',
        { class: 'bf-server-head' },
        h('strong', {}, name),
        server.hostname ? h('span', { class: 'bf-dim' }, server.address) : null,
        server.simulated ? simulatedBadge() : null,
        sandboxBadge(server.sandbox),
        server.dashboard_url
          ? h(
              'a',
              {
                class: 'bf-dashboard',
                'data-testid': 'bf-dashboard',
                href: server.dashboard_url,
                target: '_blank',
                rel: 'noopener noreferrer',
                title: "The gateway's cluster dashboard"
              },
              'Dashboard ↗'
            )
          : null
      ),
      server.state === 'ok'
        ? null
        : h(
            'p',
            { class: 'bf-state bf-warn', 'data-testid': 'bf-server-error' },
            serverSentence(server)
          ),
      ...server.gpus.map(gpu => this._renderGpu(gpu))
    );
  }

  private _renderGpu(gpu: IPoolGpu): HTMLElement {
    const mine = gpu.mine.reduce((sum, s) => sum + s.mib, 0);
    const total = gpu.memory_total_mib;
    const free = gpu.memory_free_mib;
    const util = gpu.utilization_pct === null ? '' : ` · util ${gpu.utilization_pct} %`;
    return h(
      'div',
      {
        class: 'bf-gpu',
        'data-testid': 'bf-gpu',
        'data-index': gpu.index,
        'data-simulated': gpu.simulated
      },
      h(
        'div',
        { class: 'bf-row' },
        h('span', {}, `GPU ${gpu.index} · ${gpu.name}`),
        gpu.simulated ? simulatedBadge() : null
      ),
      bar(
        total,
        [
          // One segment per share of mine, so two shares on one GPU show as two.
          ...gpu.mine.map(share => ({
            value: share.mib,
            cls: 'bf-mine bf-share',
            title:
              `my share ${share.share_id}: ${share.mib} MiB` +
              (share.used_mib === null ? '' : `, ${share.used_mib} MiB used`) +
              (share.kernel_id ? ` (kernel ${share.kernel_id.slice(0, 8)})` : '')
          })),
          { value: gpu.others_mib, cls: 'bf-others', title: `others' shares: ${gpu.others_mib} MiB` }
        ],
        'bf-gpu-bar'
      ),
      h(
        'div',
        { class: 'bf-legend', 'data-testid': 'bf-gpu-legend' },
        h('span', { class: 'bf-key bf-mine' }),
        `mine ${mine} · `,
        h('span', { class: 'bf-key bf-others' }),
        `others ${gpu.others_mib} · `,
        h('span', { class: 'bf-key bf-free' }),
        `free ${free} of ${total} MiB${util}`
      )
    );
  }

  private _renderKernels(kernels: IKernel[]): Node[] {
    if (kernels.length === 0) {
      return [
        h(
          'p',
          { class: 'bf-dim', 'data-testid': 'bf-no-kernels' },
          'No kernels run on this Jupyter server.'
        )
      ];
    }
    return kernels.map(k => this._renderKernel(k));
  }

  private _renderKernel(kernel: IKernel): HTMLElement {
    const share = kernel.share;
    const stopping = this._stopping.has(kernel.kernel_id);
    const button = h(
      'button',
      {
        class: 'jp-mod-styled jp-mod-warn bf-shutdown',
        'data-testid': 'bf-shutdown',
        disabled: stopping,
        title: share ? 'Shut this kernel down and give its share back' : 'Shut this kernel down'
      },
      stopping ? 'Shutting down…' : 'Shut down'
    );
    button.addEventListener('click', () => void this._shutdown(kernel.kernel_id));
    let detail: Node[];
    if (!share) {
      detail = [h('div', { class: 'bf-dim', 'data-testid': 'bf-local' }, 'runs locally (no share)')];
    } else {
      const perGpu = share.gpus[0]?.mib ?? null;
      detail = [
        h(
          'div',
          { class: 'bf-row', 'data-testid': 'bf-share' },
          h('span', {}, `${shareSize(share.gpus.length, perGpu, null)} on ${share.server}`),
          share.gpus.some(g => g.simulated) ? simulatedBadge() : null
        ),
        h('div', { class: 'bf-dim bf-share-id' }, `share ${share.share_id}`),
        ...share.gpus.map(g => {
          const over = g.used_mib !== null && g.used_mib > g.mib;
          return h(
            'div',
            { class: 'bf-share-gpu' },
            bar(
              g.mib,
              [
                {
                  value: g.used_mib ?? 0,
                  cls: over ? 'bf-over' : 'bf-used',
                  title: `used ${mib(g.used_mib)} of ${g.mib} MiB`
                }
              ],
              'bf-usage-bar'
            ),
            h(
              'div',
              { class: over ? 'bf-legend bf-warn' : 'bf-legend', 'data-testid': 'bf-usage' },
              `GPU ${g.index}: ${g.used_mib === null ? 'usage unknown' : `${mib(g.used_mib)} MiB`}` +
                ` used of ${g.mib} MiB${over ? ' (over its share)' : ''}`
            )
          );
        })
      ];
    }
    return h(
      'div',
      {
        class: 'bf-kernel',
        'data-testid': 'bf-kernel',
        'data-kernel-id': kernel.kernel_id,
        'data-share-id': share?.share_id
      },
      h(
        'div',
        { class: 'bf-row' },
        h('strong', {}, this._host.displayName(kernel.name)),
        h('span', { class: 'bf-dim' }, kernel.execution_state),
        button
      ),
      ...detail,
      noticeLine(kernel.notice)
    );
  }

  private async _shutdown(kernelId: string): Promise<void> {
    this._stopping.add(kernelId);
    this._render();
    try {
      await request(`kernels/${encodeURIComponent(kernelId)}/shutdown`, { method: 'POST' });
      await this._host.kernelsChanged();
    } catch (error) {
      this._say((error as Error).message, true);
    } finally {
      this._stopping.delete(kernelId);
      await this._feed.refresh();
    }
  }

  private _startForm(): HTMLElement {
    const gpus = h('input', {
      type: 'number',
      min: 1,
      step: 1,
      value: 1,
      class: 'bf-input',
      'data-testid': 'bf-gpus',
      'aria-label': 'GPUs'
    }) as HTMLInputElement;
    const kind = h(
      'select',
      { class: 'bf-input', 'data-testid': 'bf-size-kind', 'aria-label': 'Share size' },
      h('option', { value: 'mib' }, 'MiB per GPU'),
      h('option', { value: 'fraction' }, 'fraction of each GPU'),
      h('option', { value: 'whole' }, 'whole GPUs')
    ) as HTMLSelectElement;
    const size = h('input', {
      type: 'number',
      min: 1,
      step: 1,
      value: 4096,
      class: 'bf-input',
      'data-testid': 'bf-size',
      'aria-label': 'Size'
    }) as HTMLInputElement;
    kind.addEventListener('change', () => {
      size.hidden = kind.value === 'whole';
      if (kind.value === 'fraction') {
        Object.assign(size, { min: '0.01', max: '1', step: '0.05', value: '0.5' });
      } else {
        Object.assign(size, { min: '1', max: '', step: '1', value: '4096' });
      }
    });
    const start = h(
      'button',
      { type: 'submit', class: 'jp-mod-styled jp-mod-accept', 'data-testid': 'bf-start' },
      'Start notebook'
    ) as HTMLButtonElement;
    const files = h('input', {
      type: 'checkbox',
      checked: true,
      'data-testid': 'bf-files',
      title:
        "The kernel works in its notebook's folder, carried live to the share at the same path"
    }) as HTMLInputElement;
    const form = h(
      'form',
      { class: 'bf-form', 'data-testid': 'bf-form' },
      h('label', {}, gpus, ' GPUs × '),
      size,
      kind,
      h('label', { class: 'bf-files' }, files, " in the notebook's folder"),
      start
    ) as HTMLFormElement;
    form.addEventListener('submit', event => {
      event.preventDefault();
      const n = Number(gpus.value);
      const value = Number(size.value);
      const req: IShareRequest = {
        gpus: n,
        mib: kind.value === 'mib' ? value : null,
        fraction: kind.value === 'fraction' ? value : null,
        files: files.checked
      };
      const problem = checkRequest(req);
      if (problem) {
        this._say(problem, true);
        return;
      }
      start.disabled = true;
      void this._startOn(req).finally(() => (start.disabled = false));
    });
    return h(
      'section',
      { class: 'bf-section', 'data-testid': 'bf-start-section' },
      h('h3', {}, 'Start a notebook on a share'),
      this._presets,
      form
    );
  }

  private _renderPresets(presets: IPreset[]): void {
    // Smallest first; whole GPUs (no fraction, no MiB) count as a fraction of 1.
    const size = (p: IPreset) => [p.gpus, p.fraction ?? (p.mib === null ? 1 : 0), p.mib ?? 0];
    const sorted = [...presets].sort((a, b) => {
      const [x, y] = [size(a), size(b)];
      return x[0] - y[0] || x[1] - y[1] || x[2] - y[2];
    });
    this._presets.replaceChildren(
      ...sorted.map(p => {
        const button = h(
          'button',
          {
            class: 'jp-mod-styled bf-preset',
            'data-testid': 'bf-preset',
            'data-name': p.name,
            title: `Start a notebook with "${p.display_name}"`
          },
          // "Python 3 · 1 GPU × ½" says the size after the kernel's name.
          p.display_name.split(' · ').slice(1).join(' · ') || shareSize(p.gpus, p.mib, p.fraction)
        );
        button.addEventListener('click', () => void this._open(p.name, p.display_name));
        return button;
      })
    );
  }

  private async _startOn(req: IShareRequest): Promise<void> {
    this._say(`Starting a notebook on ${shareSize(req.gpus, req.mib, req.fraction)}…`);
    try {
      const spec = await request<{ name: string; display_name: string }>('kernelspecs', {
        method: 'POST',
        body: JSON.stringify(req)
      });
      await this._open(spec.name, spec.display_name);
      void this.loadPresets();
    } catch (error) {
      this._say((error as Error).message, true);
    }
  }

  private async _open(kernelspec: string, displayName: string): Promise<void> {
    this._say(`Opening a notebook with "${displayName}"…`);
    try {
      await this._host.openNotebook(kernelspec);
      this._say(`Opened a notebook with "${displayName}".`);
    } catch (error) {
      this._say(`The notebook did not open: ${(error as Error).message}`, true);
    }
  }

  private _say(text: string, isError = false): void {
    this._notice.textContent = text;
    this._notice.hidden = !text;
    this._notice.classList.toggle('bf-warn', isError);
  }

  private _feed: LiveFeed;
  private _host: IPanelHost;
  private _feedState: HTMLElement;
  private _error: HTMLElement;
  private _notice: HTMLElement;
  private _pool: HTMLElement;
  private _kernels: HTMLElement;
  private _presets: HTMLElement;
  private _stamps = new Map<string, string>();
  private _stopping = new Set<string>();
}

/** The sentence for a request the gateway would refuse anyway (null when it looks fine). */
export function checkRequest(req: IShareRequest): string | null {
  if (!Number.isInteger(req.gpus) || req.gpus < 1) {
    return 'The number of GPUs must be a whole number of at least 1.';
  }
  if (req.mib !== null && (!Number.isInteger(req.mib) || req.mib < 1)) {
    return 'The memory per GPU must be a whole number of MiB, at least 1.';
  }
  if (req.fraction !== null && !(req.fraction > 0 && req.fraction <= 1)) {
    return 'The fraction of each GPU must be above 0 and at most 1.';
  }
  return null;
}

/** Policing's last word on a kernel, with when it came; a stop stays after the restart. */
function noticeLine(notice: IPoliceNotice | null): HTMLElement | null {
  if (!notice) {
    return null;
  }
  const when = notice.at ? new Date(notice.at * 1000).toLocaleTimeString() : '';
  const what = {
    warn: 'Warned',
    stop: 'Stopped over its share',
    kernel_stopped: 'Kernel stopped',
    files: 'Folder not carried',
    idle: 'Share reclaimed (idle)'
  }[notice.action];
  return h(
    'div',
    {
      class: ['warn', 'files', 'idle'].includes(notice.action)
        ? 'bf-policed bf-warn'
        : 'bf-policed bf-error',
      'data-testid': 'bf-policed',
      'data-action': notice.action
    },
    h('strong', {}, `${what}${when ? ` at ${when}` : ''}: `),
    notice.message
  );
}
