import multiprocessing

from tokenfactory.bench.neighbour import neighbour


def test_a_noisy_neighbour_runs_beside_the_block_and_stops_with_it():
    with neighbour(None):
        assert not multiprocessing.active_children()
    with neighbour(1):
        (child,) = multiprocessing.active_children()
        assert child.is_alive()
    child.join(timeout=5)
    assert not child.is_alive() and not multiprocessing.active_children()
