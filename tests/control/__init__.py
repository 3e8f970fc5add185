"""Tests of the control socket server and walacorctl."""
