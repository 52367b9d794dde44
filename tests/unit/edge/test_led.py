"""StatusLed: gpiozero's LED on a MockFactory pin."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from gpiozero import LED
from gpiozero.pins.mock import MockFactory

from edge_agent.errors import ConfigError
from edge_agent.led import StatusLed

PIN = 17


@pytest.fixture
def factory() -> MockFactory:
    return MockFactory()


@pytest.fixture
def led(factory: MockFactory) -> Iterator[StatusLed]:
    status = StatusLed(PIN, pin_factory=factory)
    yield status
    status.close()


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, tuple[Any, ...], dict[str, Any]]]:
    """Record every on/off/blink that reaches gpiozero's LED."""
    recorded: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
    for name in ("on", "off", "blink"):
        original = getattr(LED, name)

        def spy(
            self: LED, *args: Any, _name: str = name, _original: Any = original, **kw: Any
        ) -> Any:
            recorded.append((_name, args, kw))
            return _original(self, *args, **kw)

        monkeypatch.setattr(LED, name, spy)
    return recorded


def wait_for(condition: Any, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def test_no_pin_does_nothing_and_imports_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gpiozero", None)  # any import would fail
    status = StatusLed(None)
    status.connected()
    status.buffering()
    status.off()
    status.close()
    status.close()
    assert status.pin is None


def test_nothing_is_claimed_before_first_use(factory: MockFactory) -> None:
    status = StatusLed(PIN, pin_factory=factory)
    assert factory.pins == {}
    status.close()


def test_connected_is_solid_on(led: StatusLed, factory: MockFactory) -> None:
    led.connected()
    pin = factory.pin(PIN)
    assert pin.state is True
    time.sleep(0.05)
    assert [s.state for s in pin.states] == [False, True]


def test_off(led: StatusLed, factory: MockFactory) -> None:
    led.connected()
    led.off()
    assert factory.pin(PIN).state is False


def test_buffering_blinks(led: StatusLed, factory: MockFactory, calls: list[Any]) -> None:
    led.buffering()
    assert calls == [("blink", (0.2, 0.8), {"background": True})]
    pin = factory.pin(PIN)
    # On at once, off after 0.2 s.
    assert wait_for(lambda: [s.state for s in pin.states][:3] == [False, True, False])
    on_for = pin.states[2].timestamp
    assert 0.15 < on_for < 0.5


def test_same_state_twice_does_not_restart(led: StatusLed, calls: list[Any]) -> None:
    led.buffering()
    led.buffering()
    led.connected()
    led.connected()
    led.off()
    led.off()
    assert [name for name, _, _ in calls] == ["blink", "on", "off"]


def test_buffering_then_connected_stops_the_blink(led: StatusLed, factory: MockFactory) -> None:
    led.buffering()
    led.connected()
    pin = factory.pin(PIN)
    time.sleep(0.3)  # longer than the blink's on-time
    assert pin.state is True


def test_close_turns_off_and_is_safe_twice(factory: MockFactory) -> None:
    status = StatusLed(PIN, pin_factory=factory)
    status.buffering()
    status.close()
    status.close()
    pin = factory.pin(PIN)
    assert pin.state is False
    assert pin.function == "input"  # released
    status.connected()  # after close: ignored
    assert pin.state is False


def test_context_manager(factory: MockFactory) -> None:
    with StatusLed(PIN, pin_factory=factory) as status:
        status.connected()
    assert factory.pin(PIN).state is False


@pytest.mark.parametrize("pin", [-1, 28, 40, True])
def test_rejects_pins_outside_bcm(pin: int) -> None:
    with pytest.raises(ConfigError, match="BCM"):
        StatusLed(pin)
