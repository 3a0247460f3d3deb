// Command validate-envoy checks Envoy bootstrap files as Envoy would parse them: YAML to JSON,
// JSON into the envoy.config.bootstrap.v3.Bootstrap protobuf (protojson: unknown fields, wrong
// types and unknown enum values are errors), then the API's validation rules (protoc-gen-validate:
// ValidateAll) on the bootstrap and on every typed_config it holds, unpacked. A field or enum value
// that the API marks deprecated is an error too: Envoy refuses some of them by default, and warns
// about the others.
//
//	validate-envoy FILE...
//
// Prints "ok FILE" for each good file; otherwise every problem found, and exits 1.
//
// An extension's typed_config can only be read when its package is linked in: the blank imports
// below. A "@type" that none registers is reported as such (add its import here).
package main

import (
	"errors"
	"fmt"
	"os"
	"strings"

	bootstrap "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/descriptorpb"
	"google.golang.org/protobuf/types/known/anypb"
	"sigs.k8s.io/yaml"

	// The typed_config extensions of deploy/envoy/envoy.yaml, and the ones a change to it would
	// most likely add.
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/file/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/stream/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/clusters/dns/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/cors/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/grpc_stats/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/grpc_web/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/health_check/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/local_ratelimit/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/network/dns_resolver/cares/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/retry/host/previous_hosts/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: validate-envoy FILE...")
		os.Exit(2)
	}
	failed := false
	for _, path := range os.Args[1:] {
		problems := check(path)
		if len(problems) == 0 {
			fmt.Println("ok", path)
			continue
		}
		failed = true
		for _, problem := range problems {
			fmt.Fprintf(os.Stderr, "%s: %s\n", path, problem)
		}
	}
	if failed {
		os.Exit(1)
	}
}

// check returns every problem of the bootstrap file at path.
func check(path string) []string {
	text, err := os.ReadFile(path)
	if err != nil {
		return []string{err.Error()}
	}
	// Strict: a key given twice is an error, as in Envoy's own YAML reading.
	jsonText, err := yaml.YAMLToJSONStrict(text)
	if err != nil {
		return []string{"YAML: " + err.Error()}
	}
	config := &bootstrap.Bootstrap{}
	if err := protojson.Unmarshal(jsonText, config); err != nil {
		problem := "Bootstrap: " + err.Error()
		if strings.Contains(problem, "unable to resolve") {
			problem += " (an extension type not linked in: add its package to deploy/validate/main.go)"
		}
		return []string{problem}
	}
	var problems []string
	problems = append(problems, validate("", config)...)
	problems = append(problems, walk("", config.ProtoReflect())...)
	return problems
}

// validate runs the message's protoc-gen-validate rules, each violation a problem.
func validate(where string, message proto.Message) []string {
	validator, ok := message.(interface{ ValidateAll() error })
	if !ok {
		return nil
	}
	err := validator.ValidateAll()
	if err == nil {
		return nil
	}
	var problems []string
	var multi interface{ AllErrors() []error }
	if errors.As(err, &multi) {
		for _, each := range multi.AllErrors() {
			problems = append(problems, at(where, each.Error()))
		}
		return problems
	}
	return []string{at(where, err.Error())}
}

// walk visits every set field of message: a deprecated field or enum value is a problem, and each
// google.protobuf.Any (a typed_config) is unpacked, validated and walked in turn.
func walk(where string, message protoreflect.Message) []string {
	if any, ok := message.Interface().(*anypb.Any); ok {
		inner, err := any.UnmarshalNew()
		if err != nil {
			return []string{at(where, fmt.Sprintf("%s: %v (no extension registered for it: add its package to deploy/validate/main.go)", any.GetTypeUrl(), err))}
		}
		name := string(inner.ProtoReflect().Descriptor().FullName())
		inside := where + "<" + name + ">"
		return append(validate(inside, inner), walk(inside, inner.ProtoReflect())...)
	}
	var problems []string
	message.Range(func(field protoreflect.FieldDescriptor, value protoreflect.Value) bool {
		name := where + "." + string(field.Name())
		if options, ok := field.Options().(*descriptorpb.FieldOptions); ok && options.GetDeprecated() {
			problems = append(problems, at(name, "deprecated field"))
		}
		switch {
		case field.IsList():
			list := value.List()
			for i := 0; i < list.Len(); i++ {
				problems = append(problems, visit(fmt.Sprintf("%s[%d]", name, i), field, list.Get(i))...)
			}
		case field.IsMap():
			value.Map().Range(func(key protoreflect.MapKey, item protoreflect.Value) bool {
				problems = append(problems, visit(fmt.Sprintf("%s[%v]", name, key.Interface()), field.MapValue(), item)...)
				return true
			})
		default:
			problems = append(problems, visit(name, field, value)...)
		}
		return true
	})
	return problems
}

// visit checks one value of a field: walks a message, checks an enum value's deprecation.
func visit(where string, field protoreflect.FieldDescriptor, value protoreflect.Value) []string {
	switch field.Kind() {
	case protoreflect.MessageKind, protoreflect.GroupKind:
		return walk(where, value.Message())
	case protoreflect.EnumKind:
		enum := field.Enum().Values().ByNumber(value.Enum())
		if enum == nil {
			return nil
		}
		if options, ok := enum.Options().(*descriptorpb.EnumValueOptions); ok && options.GetDeprecated() {
			return []string{at(where, fmt.Sprintf("deprecated value %s", enum.Name()))}
		}
	}
	return nil
}

func at(where, what string) string {
	where = strings.TrimPrefix(where, ".")
	if where == "" {
		return what
	}
	return where + ": " + what
}
