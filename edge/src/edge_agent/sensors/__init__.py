"""Sensor drivers behind one interface: :class:`Sensor`'s ``read() -> Sample``.

Importing this package touches no hardware and imports no hardware library: each driver loads
its library (gpiozero, adafruit_dht, adafruit_bme280, board) on its first read. The drivers
the agent can build, one per contract kind, are in :mod:`edge_agent.sensors.registry`.
"""

from __future__ import annotations

from edge_agent.sensors.base import (
    SENSOR_ID_PATTERN,
    Calibrated,
    Named,
    Sample,
    Sensor,
    check_sample,
    check_sensor_id,
)
from edge_agent.sensors.bme280 import BME280, BME280Device
from edge_agent.sensors.cpu import CPUTemp
from edge_agent.sensors.dht22 import DHT22, DHTDevice
from edge_agent.sensors.ds18b20 import DS18B20, W1_ROOT, discover, parse_temperature, parse_w1_slave
from edge_agent.sensors.simulator import Simulated, default_sensors

__all__ = [
    "BME280",
    "DHT22",
    "DS18B20",
    "SENSOR_ID_PATTERN",
    "W1_ROOT",
    "BME280Device",
    "CPUTemp",
    "Calibrated",
    "DHTDevice",
    "Named",
    "Sample",
    "Sensor",
    "Simulated",
    "check_sample",
    "check_sensor_id",
    "default_sensors",
    "discover",
    "parse_temperature",
    "parse_w1_slave",
]
