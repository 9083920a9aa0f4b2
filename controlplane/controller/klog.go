package controller

import (
	"fmt"

	"github.com/go-logr/logr"
	"go.uber.org/zap"
)

// Logr adapts log to logr, so that client-go's own messages (klog: watch errors, retries) are
// written as the controller's JSON lines instead of klog's text on stderr. klog's verbosity
// levels above 0 are debug.
func Logr(log *zap.Logger) logr.Logger { return logr.New(&zapSink{log: log}) }

type zapSink struct {
	log  *zap.Logger
	name string
}

func (s *zapSink) Init(logr.RuntimeInfo) {}

func (s *zapSink) Enabled(level int) bool {
	if level > 0 {
		return s.log.Core().Enabled(zap.DebugLevel)
	}
	return s.log.Core().Enabled(zap.InfoLevel)
}

func (s *zapSink) Info(level int, msg string, kv ...any) {
	if level > 0 {
		s.log.Debug(msg, fields(kv)...)
		return
	}
	s.log.Info(msg, fields(kv)...)
}

func (s *zapSink) Error(err error, msg string, kv ...any) {
	s.log.Warn(msg, append(fields(kv), zap.Error(err))...)
}

func (s *zapSink) WithValues(kv ...any) logr.LogSink {
	return &zapSink{log: s.log.With(fields(kv)...), name: s.name}
}

func (s *zapSink) WithName(name string) logr.LogSink {
	return &zapSink{log: s.log.Named(name), name: name}
}

func fields(kv []any) []zap.Field {
	out := make([]zap.Field, 0, len(kv)/2)
	for i := 0; i+1 < len(kv); i += 2 {
		out = append(out, zap.Any(fmt.Sprint(kv[i]), kv[i+1]))
	}
	return out
}
