package policy

import (
	"encoding/json"
	"fmt"
	"math"
	"strconv"

	cedar "github.com/cedar-policy/cedar-go"
)

// Bounds of context.mcp.arguments. The arguments come from the agent, so a call whose
// arguments exceed them is not decided: it is a policy_error (fail closed), never a
// truncated record that a policy might misjudge.
const (
	// MaxArgumentsDepth is how deeply arguments may nest: the arguments object is level 1,
	// an object or array inside it level 2, and so on.
	MaxArgumentsDepth = 8
	// MaxArgumentsValues is how many values (objects, arrays and scalars, the arguments object
	// included) the arguments may hold.
	MaxArgumentsValues = 1000
)

var (
	// ErrArgumentsTooDeep and ErrArgumentsTooLarge are the decision errors of arguments over
	// the bounds.
	ErrArgumentsTooDeep  = fmt.Errorf("policy: mcp arguments nest deeper than %d levels", MaxArgumentsDepth)
	ErrArgumentsTooLarge = fmt.Errorf("policy: mcp arguments hold more than %d values", MaxArgumentsValues)
)

// argumentsRecord converts MCP call arguments, as decoded by encoding/json with UseNumber, to
// a Cedar record:
//
//   - objects become records; a null member is left out (Cedar has no null: `has` is false);
//   - arrays become sets (Cedar has no list: order and duplicates are lost; nulls are left out);
//   - strings and booleans stay as they are;
//   - numbers that are integers in Long's range become Long; any other number becomes the
//     String of its JSON text (so `1.5` is "1.5" and never compares as a Long).
//
// float64 and Go integer types are accepted too (for arguments decoded without UseNumber).
func argumentsRecord(args map[string]any) (cedar.Record, error) {
	if len(args) == 0 {
		return cedar.Record{}, nil
	}
	c := argConverter{left: MaxArgumentsValues}
	v, err := c.value(args, 1)
	if err != nil {
		return cedar.Record{}, err
	}
	return v.(cedar.Record), nil
}

type argConverter struct {
	left int // values still allowed
}

// value converts v, found at nesting level depth (nulls are left out by the caller).
func (c *argConverter) value(v any, depth int) (cedar.Value, error) {
	if c.left--; c.left < 0 {
		return nil, ErrArgumentsTooLarge
	}
	switch v := v.(type) {
	case map[string]any:
		if depth > MaxArgumentsDepth {
			return nil, ErrArgumentsTooDeep
		}
		m := make(cedar.RecordMap, len(v))
		for k, e := range v {
			if e == nil {
				continue
			}
			cv, err := c.value(e, depth+1)
			if err != nil {
				return nil, err
			}
			m[cedar.String(k)] = cv
		}
		return cedar.NewRecord(m), nil
	case []any:
		if depth > MaxArgumentsDepth {
			return nil, ErrArgumentsTooDeep
		}
		s := make([]cedar.Value, 0, len(v))
		for _, e := range v {
			if e == nil {
				continue
			}
			cv, err := c.value(e, depth+1)
			if err != nil {
				return nil, err
			}
			s = append(s, cv)
		}
		return cedar.NewSet(s...), nil
	case string:
		return cedar.String(v), nil
	case bool:
		return cedar.Boolean(v), nil
	case json.Number:
		if n, err := strconv.ParseInt(string(v), 10, 64); err == nil {
			return cedar.Long(n), nil
		}
		return cedar.String(v), nil
	case float64:
		if v == math.Trunc(v) && v >= math.MinInt64 && v < math.MaxInt64 {
			return cedar.Long(int64(v)), nil
		}
		return cedar.String(strconv.FormatFloat(v, 'g', -1, 64)), nil
	case int:
		return cedar.Long(v), nil
	case int64:
		return cedar.Long(v), nil
	case int32:
		return cedar.Long(v), nil
	}
	return nil, fmt.Errorf("policy: mcp arguments hold a %T, which JSON does not produce", v)
}
