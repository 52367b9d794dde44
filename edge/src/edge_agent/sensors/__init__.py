"""Sensor drivers behind one interface: :class:`Sensor`'s ``read() -> Sample``.

Importing this package touches no hardware and imports no hardware library: each driver loads
its library (gpiozero, adafruit_dht, board) on its first read.
"""

from __future__ import annotations

from edge_agent.sensors.base import SENSOR_ID_PATTERN, Calibrated, Sample, Sensor, check_sensor_id
from edge_agent.sensors.cpu import CPUTemp
from edge_agent.sensors.dht22 import DHT22, DHTDevice
from edge_agent.sensors.ds18b20 import DS18B20, W1_ROOT, discover, parse_temperature, parse_w1_slave
from edge_agent.sensors.simulator import Simulated, default_sensors

__all__ = [
    "DHT22",
    "DS18B20",
    "SENSOR_ID_PATTERN",
    "W1_ROOT",
    "CPUTemp",
    "Calibrated",
    "DHTDevice",
    "Sample",
    "Sensor",
    "Simulated",
    "check_sensor_id",
    "default_sensors",
    "discover",
    "parse_temperature",
    "parse_w1_slave",
]
