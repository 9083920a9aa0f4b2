//go:build race

package e2e

// raceEnabled: the suite runs under -race, so the escrow binary is built with it too.
const raceEnabled = true
