// Policing's notices (and a folder that stayed behind) as JupyterLab notifications. The kernel shim puts each notice in the
// running cell's output with its numbers under metadata.bitfusion.notice; this raises a
// notification for it, so a user looking at another cell, or another notebook, sees it too.

import { ILabShell } from '@jupyterlab/application';
import { ISessionContext, Notification } from '@jupyterlab/apputils';
import { KernelMessage } from '@jupyterlab/services';

export interface IPoliceNotice {
  action: 'warn' | 'stop' | 'kernel_stopped' | 'files' | 'idle';
  message: string;
  share_id?: string;
  gpu_index?: number;
  used_mib?: number;
  limit_mib?: number;
  stop_in_s?: number;
  at?: number;
}

/** The notice a kernel message carries, if it is one of ours. */
export function noticeOf(msg: KernelMessage.IMessage): IPoliceNotice | null {
  const meta = msg.metadata as { bitfusion?: { notice?: IPoliceNotice } } | undefined;
  return meta?.bitfusion?.notice ?? null;
}

/** Show one notice: warnings and stops go by themselves; a stopped kernel stays until
 * dismissed, since its variables are gone. */
export function notify(notice: IPoliceNotice, where: string): void {
  const text = `${where}: ${notice.message}`;
  if (notice.action === 'warn' || notice.action === 'files') {
    Notification.warning(text, { autoClose: 15000 });
  } else if (notice.action === 'idle') {
    // The kernel goes on locally: worth reading, not an error.
    Notification.warning(text, { autoClose: false });
  } else if (notice.action === 'stop') {
    Notification.error(text, { autoClose: 30000 });
  } else {
    Notification.error(text, { autoClose: false });
  }
}

/** Watch every notebook and console in the main area for policing's notices. */
export function watchNotices(labShell: ILabShell): void {
  const watched = new WeakSet<ISessionContext>();
  const seen = new Set<string>(); // a kernel open in two widgets says each notice once
  const hook = (): void => {
    for (const widget of labShell.widgets('main')) {
      const context = (widget as unknown as { sessionContext?: ISessionContext }).sessionContext;
      if (!context || watched.has(context)) {
        continue;
      }
      watched.add(context);
      context.iopubMessage.connect((ctx, msg) => {
        const notice = noticeOf(msg);
        if (notice && !seen.has(msg.header.msg_id)) {
          seen.add(msg.header.msg_id);
          notify(notice, ctx.name || widget.title.label);
        }
      });
    }
  };
  labShell.layoutModified.connect(hook);
  labShell.currentChanged.connect(hook);
  hook();
}
