// The server extension's REST/WebSocket contract (bitfusion_jupyter/serverext/__init__.py)
// and a live feed of it: the WebSocket push when it works, a 2 s poll of the GET routes when not.

import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';
import { ISignal, Signal } from '@lumino/signaling';

import { IPoliceNotice } from './notices';

export interface IMyShare {
  share_id: string;
  mib: number;
  used_mib: number | null;
  kernel_id: string | null;
}

export interface IPoolGpu {
  index: number;
  uuid: string;
  name: string;
  memory_total_mib: number;
  memory_granted_mib: number;
  memory_free_mib: number;
  memory_used_mib: number | null;
  utilization_pct: number | null;
  simulated: boolean;
  shares: number;
  mine: IMyShare[];
  others_mib: number;
}

export type ServerState = 'ok' | 'unreachable' | 'unauthorized' | 'error';

export interface IPoolServer {
  address: string;
  state: ServerState;
  error: string | null;
  hostname: string | null;
  simulated: boolean;
  /** How the gateway walls shares off; null until it answers. */
  sandbox: { sandboxed: boolean; refused: boolean; line: string } | null;
  dashboard_url: string | null;
  gpus: IPoolGpu[];
}

export interface IPool {
  configured: boolean;
  message: string | null;
  servers: IPoolServer[];
}

export interface IShareGpu {
  index: number;
  name: string;
  uuid: string;
  mib: number;
  simulated: boolean;
  used_mib: number | null;
}

export interface IKernelShare {
  server: string;
  share_id: string;
  kernel: string | null;
  since: number | string | null;
  gpus: IShareGpu[];
}

export interface IKernel {
  kernel_id: string;
  name: string;
  execution_state: string;
  share: IKernelShare | null;
  notice: IPoliceNotice | null; // policing's last word on this kernel
}

export interface IPreset {
  name: string;
  display_name: string;
  gpus: number;
  mib: number | null;
  fraction: number | null;
}

export interface IShareRequest {
  gpus: number;
  mib: number | null;
  fraction: number | null;
  files?: boolean; // the kernels work in their notebook's folder, carried to the share
}

export interface ILive {
  pool: IPool;
  kernels: { kernels: IKernel[] };
}

const API = 'bitfusion/api';

/** One sentence for a failed request: the server's own `message` when it sent one. */
async function failure(response: Response): Promise<Error> {
  let message = '';
  try {
    message = (await response.json()).message ?? '';
  } catch {
    // not JSON: fall through to the generic sentence
  }
  if (response.status === 404 && !message) {
    message =
      'The bitfusion server extension does not answer; install bitfusion-jupyter in the ' +
      "Jupyter server's Python and restart it.";
  }
  return new Error(message || `The Jupyter server answered ${response.status}.`);
}

/** A request to the server extension, through the server's own auth (token, xsrf). */
export async function request<T>(path: string, init: RequestInit = {}): Promise<T> {
  const settings = ServerConnection.makeSettings();
  const url = URLExt.join(settings.baseUrl, API, path);
  let response: Response;
  try {
    response = await ServerConnection.makeRequest(url, init, settings);
  } catch (error) {
    throw new Error('The Jupyter server does not answer; is it still running?');
  }
  if (!response.ok) {
    throw await failure(response);
  }
  return (await response.json()) as T;
}

export type FeedState = 'connecting' | 'live' | 'polling';

/**
 * The pool and this server's kernels, kept current. Listeners get `changed` with each update;
 * `error` holds the sentence of the last failed update (null once one succeeds).
 */
export class LiveFeed {
  static readonly POLL_MS = 2000;
  static readonly MAX_RECONNECT_MS = 30000;

  data: ILive | null = null;
  error: string | null = null;
  state: FeedState = 'connecting';

  get changed(): ISignal<this, void> {
    return this._changed;
  }

  start(): void {
    void this.refresh();
    this._connect();
  }

  dispose(): void {
    this._disposed = true;
    this._stopPolling();
    if (this._reconnect !== null) {
      window.clearTimeout(this._reconnect);
    }
    this._socket?.close();
  }

  /** One GET round now (after an action, so the panel does not wait for the next push). */
  async refresh(): Promise<void> {
    try {
      const [pool, kernels] = await Promise.all([
        request<IPool>('pool'),
        request<{ kernels: IKernel[] }>('kernels')
      ]);
      this._update({ pool, kernels }, null);
    } catch (error) {
      this._update(this.data, (error as Error).message);
    }
  }

  private _update(data: ILive | null, error: string | null): void {
    this.data = data;
    this.error = error;
    this._changed.emit();
  }

  private _connect(): void {
    if (this._disposed) {
      return;
    }
    const settings = ServerConnection.makeSettings();
    let url = URLExt.join(settings.wsUrl, API, 'live');
    // As @jupyterlab/services does for kernel sockets: the token where cookies may not do.
    if (settings.token && settings.appendToken) {
      url += `?token=${encodeURIComponent(settings.token)}`;
    }
    const socket = new settings.WebSocket(url);
    this._socket = socket;
    socket.onopen = () => {
      this._backoff = LiveFeed.POLL_MS;
      this._stopPolling();
      this._setState('live');
    };
    socket.onmessage = event => {
      try {
        this._update(JSON.parse(event.data as string) as ILive, null);
      } catch {
        // a malformed push: keep the last good data, the next one comes in a second
      }
    };
    socket.onclose = () => {
      if (this._socket !== socket || this._disposed) {
        return;
      }
      this._socket = null;
      // Poll while the socket is down, and try it again with a growing delay.
      this._setState('polling');
      this._startPolling();
      this._reconnect = window.setTimeout(() => {
        this._reconnect = null;
        this._connect();
      }, this._backoff);
      this._backoff = Math.min(this._backoff * 2, LiveFeed.MAX_RECONNECT_MS);
    };
  }

  private _setState(state: FeedState): void {
    if (this.state !== state) {
      this.state = state;
      this._changed.emit();
    }
  }

  private _startPolling(): void {
    if (this._poll === null) {
      void this.refresh();
      this._poll = window.setInterval(() => void this.refresh(), LiveFeed.POLL_MS);
    }
  }

  private _stopPolling(): void {
    if (this._poll !== null) {
      window.clearInterval(this._poll);
      this._poll = null;
    }
  }

  private _changed = new Signal<this, void>(this);
  private _socket: WebSocket | null = null;
  private _poll: number | null = null;
  private _reconnect: number | null = null;
  private _backoff = LiveFeed.POLL_MS;
  private _disposed = false;
}

/** "1 × 4096 MiB", "2 × 50 %": a share's size as the CLI's -n/-m/-p say it. */
export function shareSize(gpus: number, mib: number | null, fraction: number | null): string {
  if (fraction !== null) {
    return `${gpus} × ${Math.round(fraction * 100)} %`;
  }
  if (mib !== null) {
    return `${gpus} × ${mib} MiB`;
  }
  return `${gpus} × whole GPU`;
}
