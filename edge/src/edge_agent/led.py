"""An optional status LED: solid when connected to the broker, blinking while buffering.

gpiozero (the ``pi`` extra) is imported only when a pin is configured and the LED is first
used, so a node without an LED, or a development machine, never loads it.
"""

from __future__ import annotations

import threading
from types import TracebackType
from typing import Final, Literal, Protocol, Self

from edge_agent.errors import ConfigError, EdgeError

__all__ = ["StatusLed"]

_GPIO_PINS: Final = range(28)  # BCM numbers on the 40-pin header
_BLINK_ON_S: Final = 0.2
_BLINK_OFF_S: Final = 0.8

_State = Literal["off", "connected", "buffering"]


class _LedDevice(Protocol):
    """The part of ``gpiozero.LED`` this module uses."""

    def on(self) -> None: ...

    def off(self) -> None: ...

    def blink(self, on_time: float, off_time: float, *, background: bool) -> None: ...

    def close(self) -> None: ...


class StatusLed:
    """The node's status LED on BCM ``pin``, or nothing at all when ``pin`` is None.

    Each method is idempotent: asking for the state the LED is already in changes nothing, so
    a blink is never restarted. After :meth:`close`, the methods do nothing (shutdown may
    report a state after the LED is gone). Safe to call from several threads.
    """

    def __init__(self, pin: int | None, *, pin_factory: object | None = None) -> None:
        """Configure the LED; the pin is claimed on first use.

        Raises:
            ConfigError: ``pin`` is not a BCM GPIO number (0..27) or None.
        """
        if pin is not None and (
            isinstance(pin, bool) or not isinstance(pin, int) or pin not in _GPIO_PINS
        ):
            raise ConfigError(f"status LED pin {pin!r} is not a BCM GPIO number (0..27) or none")
        self._pin = pin
        self._pin_factory = pin_factory
        self._led: _LedDevice | None = None
        self._state: _State | None = None
        self._closed = False
        self._lock = threading.Lock()

    @property
    def pin(self) -> int | None:
        return self._pin

    def connected(self) -> None:
        """Solid on.

        Raises:
            EdgeError: gpiozero is missing or cannot claim the pin (first use only).
        """
        self._set("connected")

    def buffering(self) -> None:
        """Blink 0.2 s on, 0.8 s off, in gpiozero's background thread.

        Raises:
            EdgeError: gpiozero is missing or cannot claim the pin (first use only).
        """
        self._set("buffering")

    def off(self) -> None:
        """Dark.

        Raises:
            EdgeError: gpiozero is missing or cannot claim the pin (first use only).
        """
        self._set("off")

    def close(self) -> None:
        """Turn the LED off and release the pin; safe to call more than once."""
        with self._lock:
            self._closed = True
            led, self._led = self._led, None
            if led is not None:
                led.off()  # dark before release, whatever the pin driver does on release
                led.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _set(self, state: _State) -> None:
        with self._lock:
            if self._pin is None or self._closed or state == self._state:
                return
            led = self._led or self._open(self._pin)
            if state == "connected":
                led.on()
            elif state == "buffering":
                led.blink(_BLINK_ON_S, _BLINK_OFF_S, background=True)
            else:
                led.off()
            self._state = state

    def _open(self, pin: int) -> _LedDevice:
        try:
            # Imported here: gpiozero is an optional extra, and only needed with an LED.
            from gpiozero import LED, GPIOZeroError  # noqa: PLC0415
        except ImportError as exc:
            raise EdgeError(
                f"status LED on GPIO{pin} needs gpiozero ({exc}): install the `pi` extra "
                "(pip install 'edge-agent[pi]') or remove the LED pin from the configuration"
            ) from exc
        try:
            led: _LedDevice = LED(pin, pin_factory=self._pin_factory)
        except (GPIOZeroError, OSError) as exc:
            raise EdgeError(
                f"status LED on GPIO{pin} cannot be set up ({exc}): is the pin used by "
                "another process or device?"
            ) from exc
        self._led = led
        return led
