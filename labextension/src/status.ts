// The status-bar item: the share of the active notebook's (or console's) kernel.

import { ISignal, Signal } from '@lumino/signaling';
import { Widget } from '@lumino/widgets';

import { IKernel, LiveFeed } from './api';

/** The kernel id of a widget with a session (notebook, console), if it has one. */
export type CurrentKernel = () => string | null;

export function shareText(kernel: IKernel | undefined): string {
  if (!kernel) {
    return 'GPU: …'; // a kernel the server extension has not listed yet
  }
  const share = kernel.share;
  if (!share) {
    return 'GPU: local';
  }
  const gpus = share.gpus;
  const perGpu = gpus[0]?.mib ?? 0;
  const known = gpus.filter(g => g.used_mib !== null);
  const used = known.reduce((sum, g) => sum + (g.used_mib ?? 0), 0);
  const simulated = gpus.some(g => g.simulated) ? ' SIMULATED' : '';
  const usage = known.length ? ` · ${used} MiB used` : '';
  return `GPU: ${gpus.length} × ${perGpu} MiB${simulated}${usage}`;
}

export class ShareStatus extends Widget {
  constructor(feed: LiveFeed, current: CurrentKernel) {
    super();
    this._feed = feed;
    this._current = current;
    this.addClass('bf-Status');
    this.node.dataset.testid = 'bf-status';
    this.node.title = "This kernel's GPU share (bitfusion)";
    feed.changed.connect(this.refresh, this);
    this.refresh();
  }

  /** Whether the active widget has a kernel, so the item is worth showing. */
  get active(): boolean {
    return this._active;
  }

  get activeChanged(): ISignal<this, void> {
    return this._activeChanged;
  }

  refresh(): void {
    const kernelId = this._current();
    const active = kernelId !== null;
    if (active !== this._active) {
      this._active = active;
      this._activeChanged.emit();
    }
    const kernels = this._feed.data?.kernels.kernels ?? [];
    this.node.textContent = active
      ? shareText(kernels.find(k => k.kernel_id === kernelId))
      : '';
  }

  dispose(): void {
    this._feed.changed.disconnect(this.refresh, this);
    super.dispose();
  }

  private _feed: LiveFeed;
  private _current: CurrentKernel;
  private _active = false;
  private _activeChanged = new Signal<this, void>(this);
}
