// bitfusion-jupyter's JupyterLab extension: the "GPU pool" sidebar panel and a status-bar item
// with the active kernel's share, both fed by the server extension under /bitfusion/api.

import {
  ILabShell,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { ICommandPalette, ISessionContext } from '@jupyterlab/apputils';
import { IStatusBar } from '@jupyterlab/statusbar';
import { LabIcon } from '@jupyterlab/ui-components';
import { Widget } from '@lumino/widgets';

import gpuSvg from '../style/icons/gpu.svg';
import { LiveFeed } from './api';
import { watchNotices } from './notices';
import { GpuPanel } from './panel';
import { ShareStatus } from './status';

export const gpuIcon = new LabIcon({ name: 'bitfusion-jupyter:gpu', svgstr: gpuSvg });

const OPEN_PANEL = 'bitfusion:open-panel';

/** The kernel id of a notebook or console; null for widgets without a kernel. */
function kernelOf(widget: Widget | null): string | null {
  const context = (widget as unknown as { sessionContext?: ISessionContext } | null)
    ?.sessionContext;
  return context?.session?.kernel?.id ?? null;
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'bitfusion-jupyter:plugin',
  description: 'The GPU pool, your kernels and their shares, and notebooks on a share.',
  autoStart: true,
  optional: [ILabShell, IStatusBar, ICommandPalette],
  activate: (
    app: JupyterFrontEnd,
    labShell: ILabShell | null,
    statusBar: IStatusBar | null,
    palette: ICommandPalette | null
  ) => {
    const services = app.serviceManager;
    const feed = new LiveFeed();
    const panel = new GpuPanel(feed, {
      displayName: name => services.kernelspecs.specs?.kernelspecs[name]?.display_name ?? name,
      openNotebook: async kernelName => {
        await services.kernelspecs.refreshSpecs();
        await app.commands.execute('notebook:create-new', { kernelName });
      },
      kernelsChanged: async () => {
        await Promise.all([services.kernels.refreshRunning(), services.sessions.refreshRunning()]);
      }
    });
    panel.title.icon = gpuIcon;
    app.shell.add(panel, 'left', { rank: 950 });

    app.commands.addCommand(OPEN_PANEL, {
      label: 'Show the GPU pool',
      icon: gpuIcon,
      execute: () => app.shell.activateById(panel.id)
    });
    palette?.addItem({ command: OPEN_PANEL, category: 'GPU (bitfusion)' });

    if (statusBar) {
      const status = new ShareStatus(feed, () => kernelOf(app.shell.currentWidget));
      statusBar.registerStatusItem('bitfusion-jupyter:share', {
        item: status,
        align: 'left',
        rank: 5,
        isActive: () => status.active,
        activeStateChanged: status.activeChanged
      });
      labShell?.currentChanged.connect(() => status.refresh());
      status.node.addEventListener('click', () => app.shell.activateById(panel.id));
    }

    if (labShell) {
      watchNotices(labShell);
    }
    feed.start();
  }
};

export default plugin;
