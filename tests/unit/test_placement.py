from remoting.shares import Slot, Want, never_fits, place

POOL = [Slot(0, 16384, 16384), Slot(1, 16384, 16384)]


def test_two_12gib_shares_land_on_different_gpus_and_a_third_does_not_fit():
    first = place(Want(1, 12288), POOL)
    assert first is not None and list(first.values()) == [12288]
    used = [Slot(s.index, s.total_mib, s.free_mib - first.get(s.index, 0)) for s in POOL]
    second = place(Want(1, 12288), used)
    assert second is not None and set(second) != set(first)
    used = [Slot(s.index, s.total_mib, s.free_mib - second.get(s.index, 0)) for s in used]
    assert place(Want(1, 12288), used) is None
    assert never_fits(Want(1, 12288), used) is None  # it fits once something is freed


def test_best_fit_packs_small_shares_onto_the_fuller_gpu():
    slots = [Slot(0, 16384, 16384), Slot(1, 16384, 6000)]
    assert place(Want(1, 4096), slots) == {1: 4096}
    assert place(Want(1, 12000), slots) == {0: 12000}  # the big one still finds room


def test_fraction_and_whole_gpus():
    slots = [Slot(0, 81920, 81920), Slot(1, 24576, 24576)]
    assert place(Want(2, fraction=0.5), slots) == {0: 40960, 1: 12288}
    assert place(Want(1), [Slot(0, 16384, 16000)]) is None  # whole GPU needs an empty one
    assert place(Want(1), [Slot(0, 16384, 16384)]) == {0: 16384}


def test_filters_and_draining_exclude_gpus():
    slots = [Slot(0, 16384, 16384, eligible=False), Slot(1, 16384, 16384)]
    assert place(Want(1, 1024), slots) == {1: 1024}
    assert place(Want(2, 1024), slots) is None
    assert "qualify" in never_fits(Want(2, 1024), slots)


def test_never_fits_names_the_reason():
    assert "largest GPU here has 16384 MiB" in never_fits(Want(1, 99999), POOL)
    assert "asks for 3 GPUs" in never_fits(Want(3, 1024), POOL)
