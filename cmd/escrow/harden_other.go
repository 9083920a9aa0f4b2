//go:build !linux

package main

// lockMemory has no portable equivalent; on Linux it makes the process non-dumpable.
func lockMemory() error { return nil }
