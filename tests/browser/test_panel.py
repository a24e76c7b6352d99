"""The "GPU pool" sidebar panel in real JupyterLab and headless Chromium: the pool, a notebook
started on a share from the panel, its live usage, the widget, and shutting it down."""

from __future__ import annotations

import re
import signal

from playwright.sync_api import Locator, Page, expect

from gateway.spawned import free_port, stop_leftovers
from tests.support.gateways import GatewayProcess, start_gateway
from tests.support.lab import KERNEL_READY_MS, Lab, run_cell, start_lab, wait_for_idle_kernel
from tests.support.wire import connect


def open_panel(page: Page, lab: Lab) -> None:
    # A fresh workspace: not the notebooks an earlier test left open, with their kernels gone.
    page.goto(lab.url + ("&" if "?" in lab.url else "?") + "reset")
    tab = page.locator('.jp-SideBar [data-id="bitfusion-gpu-pool"]')
    tab.click()
    expect(page.locator("#bitfusion-gpu-pool")).to_be_visible()


def start_from_form(page: Page, lab: Lab, mib: int) -> Locator:
    """Open the panel and start a notebook on one GPU × ``mib`` MiB from its form."""
    open_panel(page, lab)
    panel = page.locator("#bitfusion-gpu-pool")
    panel.get_by_test_id("bf-gpus").fill("1")
    panel.get_by_test_id("bf-size-kind").select_option("mib")
    panel.get_by_test_id("bf-size").fill(str(mib))
    panel.get_by_test_id("bf-start").click()
    return panel


def test_panel_shows_the_simulated_pool(page: Page, lab: Lab, pool_gateway: GatewayProcess, shoot):
    open_panel(page, lab)
    gpus = page.get_by_test_id("bf-gpu")
    expect(gpus).to_have_count(2)
    for i in range(2):
        expect(gpus.nth(i).get_by_test_id("bf-simulated")).to_have_text("SIMULATED")
        expect(gpus.nth(i).get_by_test_id("bf-gpu-legend")).to_contain_text("free 16384 of 16384")
    server = page.get_by_test_id("bf-server")
    expect(server).to_have_attribute("data-state", "ok")
    expect(server).to_contain_text(pool_gateway.address)
    link = server.get_by_test_id("bf-dashboard")
    expect(link).to_have_attribute("target", "_blank")
    web_port = pool_gateway.args[pool_gateway.args.index("--web-port") + 1]
    expect(link).to_have_attribute("href", re.compile(rf"^http://.+:{web_port}/$"))
    expect(page.get_by_test_id("bf-feed")).to_have_attribute("data-state", "live")
    expect(page.get_by_test_id("bf-no-kernels")).to_be_visible()
    shoot("pool")


def test_a_notebook_on_a_share_from_the_panel(
    page: Page, lab: Lab, pool_gateway: GatewayProcess, shoot
):
    panel = start_from_form(page, lab, 4096)

    # The form made a kernelspec and opened a notebook with it; a cell runs inside the share.
    wait_for_idle_kernel(page)
    run_cell(page, 'import os; os.environ["BITFUSION_SHARE_ID"]')
    outputs = page.locator(".jp-OutputArea-output")
    out = outputs.filter(has_text=re.compile(r"'s-[0-9a-f]+'"))
    expect(out).to_have_count(1, timeout=30_000)
    # The notebook is at the top of the home folder, which is never carried: the first cell
    # says so (and how to have a folder on the share), once.
    expect(outputs.filter(has_text="it holds your whole home directory")).to_have_count(1)
    share_id = re.search(r"s-[0-9a-f]+", out.inner_text()).group(0)  # type: ignore[union-attr]
    assert [s["share_id"] for s in pool_gateway.shares()] == [share_id]

    # The panel lists the kernel with that share, the pool shows it as mine.
    kernel = panel.locator(f'[data-testid="bf-kernel"][data-share-id="{share_id}"]')
    expect(kernel).to_be_visible()
    expect(kernel.get_by_test_id("bf-share")).to_contain_text("1 × 4096 MiB")
    expect(kernel.get_by_test_id("bf-simulated")).to_be_visible()
    expect(kernel.get_by_test_id("bf-usage")).to_contain_text("0 MiB used of 4096 MiB")
    expect(panel.get_by_test_id("bf-gpu-legend").first).to_contain_text("mine 4096")
    gpu0_shares = panel.get_by_test_id("bf-gpu-bar").first.locator(".bf-share")
    expect(gpu0_shares).to_have_count(1)
    expect(gpu0_shares.first).to_have_attribute("title", re.compile(share_id))

    # A second share of mine on the same GPU (best fit) is a second segment of its bar.
    held = pool_gateway.bf("request_gpus", "-m", "2048")
    assert held.returncode == 0, held.stderr
    expect(gpu0_shares).to_have_count(2, timeout=10_000)
    expect(panel.get_by_test_id("bf-gpu-legend").first).to_contain_text("mine 6144")
    assert pool_gateway.bf("release_gpus").returncode == 0
    expect(gpu0_shares).to_have_count(1, timeout=10_000)

    status = page.get_by_test_id("bf-status")
    expect(status).to_have_text("GPU: 1 × 4096 MiB SIMULATED · 0 MiB used")

    # Simulated memory held inside the share shows up as live usage.
    run_cell(
        page,
        "import subprocess, sys\n"
        'hold = subprocess.Popen([sys.executable, "-m", "gateway.simulated_alloc", "1500"])',
    )
    expect(kernel.get_by_test_id("bf-usage")).to_contain_text(
        "1500 MiB used of 4096 MiB", timeout=20_000
    )
    expect(status).to_have_text("GPU: 1 × 4096 MiB SIMULATED · 1500 MiB used")

    # The notebook's own live widget of the share.
    run_cell(page, "import bitfusion_jupyter; bitfusion_jupyter.widget()")
    expect(page.locator(".jp-OutputArea-output").last).to_contain_text(
        f"This kernel's share {share_id}", timeout=30_000
    )
    shoot("kernel-on-a-share")

    # "Shut down" ends the kernel and its share goes back to the pool.
    kernel.get_by_test_id("bf-shutdown").click()
    expect(kernel).to_have_count(0, timeout=30_000)
    assert pool_gateway.no_shares_within(20), "the share outlived its kernel's shutdown"
    expect(panel.get_by_test_id("bf-gpu-legend").first).to_contain_text("mine 0")
    shoot("after-shutdown")


def test_policing_is_said_in_the_cell_a_notification_and_the_panel(
    page: Page, lab: Lab, pool_gateway: GatewayProcess, shoot
):
    panel = start_from_form(page, lab, 2048)
    wait_for_idle_kernel(page)
    first_share = [s["share_id"] for s in pool_gateway.shares()]

    # The kernel itself holds more than its share, as `torch.empty` would.
    run_cell(
        page, "from gateway.simulated_alloc import hold\nhold(3000)\nimport time; time.sleep(60)"
    )

    # The warning: in the running cell, and as a notification, with numbers and seconds left.
    warning = "uses 3000 MiB on GPU 0, more than its 2048 MiB; its processes will be stopped in 5 s"
    outputs = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output")
    expect(outputs.filter(has_text=warning)).to_be_visible(timeout=20_000)
    expect(page.locator(".Toastify__toast").filter(has_text=warning).first).to_be_visible()
    shoot("policing-warning")

    # The stop: the cell ends with the reason, a notification stays, and the panel keeps the
    # reason after JupyterLab has restarted the kernel on a new share.
    reason = "The gateway's policing stopped this kernel: it used 3000 MiB of GPU memory on GPU 0"
    expect(outputs.filter(has_text="GPUShareExceeded")).to_contain_text(reason, timeout=30_000)
    expect(page.locator(".Toastify__toast").filter(has_text=reason).first).to_be_visible()
    kernel = panel.get_by_test_id("bf-kernel").filter(has=page.get_by_test_id("bf-policed"))
    expect(kernel.get_by_test_id("bf-policed")).to_have_attribute("data-action", "kernel_stopped")
    expect(kernel.get_by_test_id("bf-policed")).to_contain_text(reason)
    expect(kernel.get_by_test_id("bf-share")).to_be_visible(timeout=KERNEL_READY_MS)
    shares = [s["share_id"] for s in pool_gateway.shares()]
    assert len(shares) == 1 and shares != first_share  # restarted, on a new share
    shoot("policing-stopped")

    page.keyboard.press("Escape")  # JupyterLab's own "kernel restarting" dialog, if shown
    kernel.get_by_test_id("bf-shutdown").click()
    expect(kernel).to_have_count(0, timeout=30_000)
    assert pool_gateway.no_shares_within(20), "the share outlived its kernel's shutdown"


def test_a_share_reclaimed_for_idleness_is_said_on_the_kernels_row(
    page: Page, lab: Lab, pool_gateway: GatewayProcess, shoot
):
    panel = start_from_form(page, lab, 1024)
    wait_for_idle_kernel(page)
    assert len(pool_gateway.shares()) == 1
    admin = connect(pool_gateway, "root", admin=True)
    try:
        admin.request("set_idle_timeout", seconds=2)
        assert pool_gateway.no_shares_within(20), "the idle share was not reclaimed"
        kernel = panel.get_by_test_id("bf-kernel").filter(has=page.get_by_test_id("bf-policed"))
        row = kernel.get_by_test_id("bf-policed")
        expect(row).to_have_attribute("data-action", "idle", timeout=20_000)
        expect(row).to_contain_text("Share reclaimed (idle)")
        expect(row).to_contain_text("runs locally, on no share")
        idle = "went back to the pool (the admin's idle timeout)"
        expect(page.locator(".Toastify__toast").filter(has_text=idle).first).to_be_visible()
        shoot("idle-reclaimed")
        # The kernel goes on locally: a cell runs, and no share is taken for it.
        run_cell(page, "import os; print('on', os.environ.get('BITFUSION_SHARE_ID'))")
        outputs = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output")
        expect(outputs.filter(has_text="on None")).to_be_visible(timeout=KERNEL_READY_MS)
        assert pool_gateway.shares() == []
    finally:
        admin.request("set_idle_timeout", seconds=0)
        admin.close()
    page.keyboard.press("Escape")
    kernel.get_by_test_id("bf-shutdown").click()
    expect(kernel).to_have_count(0, timeout=30_000)


def test_a_notebook_from_the_panel_works_in_its_folder_on_the_share(
    page: Page, lab: Lab, pool_gateway: GatewayProcess, shoot
):
    """The form's "in the notebook's folder": the kernel runs on the share in the folder
    the notebook is in, at the same path, and what it writes is there on this machine."""
    folder = lab.log_path.parent / "project"
    folder.mkdir(exist_ok=True)
    (folder / "data.csv").write_text("a,b\n")
    base, _, query = lab.url.partition("?")
    page.goto(f"{base.rstrip('/')}/tree/project?{query}&reset")  # the file browser there
    expect(page.locator(".jp-DirListing-itemText", has_text="data.csv")).to_be_visible(
        timeout=30_000
    )  # new notebooks go where the file browser is
    page.locator('.jp-SideBar [data-id="bitfusion-gpu-pool"]').click()
    panel = page.locator("#bitfusion-gpu-pool")
    panel.get_by_test_id("bf-size").fill("2048")
    expect(panel.get_by_test_id("bf-files")).to_be_checked()  # the default
    panel.get_by_test_id("bf-start").click()
    wait_for_idle_kernel(page)
    run_cell(page, "import os; print(os.getcwd(), open('data.csv').read().strip()); "
                   "open('out.txt', 'w').write('from the share')")  # fmt: skip
    out = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output").first
    expect(out).to_contain_text(f"{folder} a,b", timeout=30_000)
    assert (folder / "out.txt").read_text() == "from the share"
    expect(panel.get_by_test_id("bf-preset").filter(has_text="1 GPU × 2 GiB")).to_have_count(1)
    shoot("notebook-in-its-folder")
    kernel = panel.get_by_test_id("bf-kernel").first
    kernel.get_by_test_id("bf-shutdown").click()
    expect(kernel).to_have_count(0, timeout=30_000)
    assert pool_gateway.no_shares_within(20)


def test_no_servers_configured_says_what_to_do(page: Page, lab_without_servers: Lab, shoot):
    open_panel(page, lab_without_servers)
    message = page.get_by_test_id("bf-message")
    expect(message).to_contain_text("No GPU servers are configured")
    expect(message).to_contain_text("bitfusion init")
    expect(page.get_by_test_id("bf-gpu")).to_have_count(0)
    shoot("no-servers")


def test_unreachable_server_and_wrong_token_are_said_plainly(
    page: Page, pool_gateway: GatewayProcess, tmp_path_factory, shoot
):
    # A token of another pool for pool_gateway, and a server where nothing listens.
    other = start_gateway(tmp_path_factory.mktemp("other-pool"), "--simulate-gpus", "1x8GiB")
    nowhere = f"127.0.0.1:{free_port()}"
    try:
        env = other.env(BITFUSION_SERVERS=f"{pool_gateway.address},{nowhere}")
        lab = start_lab(tmp_path_factory.mktemp("lab-broken"), env)
        try:
            open_panel(page, lab)
            refused = page.locator(
                f'[data-testid="bf-server"][data-address="{pool_gateway.address}"]'
            )
            expect(refused).to_have_attribute("data-state", "unauthorized")
            expect(refused.get_by_test_id("bf-server-error")).to_be_visible()
            down = page.locator(f'[data-testid="bf-server"][data-address="{nowhere}"]')
            expect(down).to_have_attribute("data-state", "unreachable")
            expect(down.get_by_test_id("bf-server-error")).to_be_visible()
            shoot("broken-servers")
        finally:
            lab.stop()
    finally:
        other.kill(signal.SIGTERM)
        stop_leftovers(other.state_dir)
