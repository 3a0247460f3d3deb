// An example client of mlx-serving's GenerateService: streaming, usage, rich errors,
// cancellation and deadlines.
//
//	go run . -addr localhost:50051 -model tiny-llama
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log"
	"os"
	"time"

	"google.golang.org/genproto/googleapis/rpc/code"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	servingv1 "github.com/mlx-serving/mlx-serving/clients/go/gen/mlx_serving/v1"
)

func main() {
	addr := flag.String("addr", env("MLX_SERVING_ADDR", "localhost:50051"), "server address (env MLX_SERVING_ADDR)")
	model := flag.String("model", env("MLX_SERVING_MODEL", "tiny-llama"), "model id (env MLX_SERVING_MODEL)")
	flag.Parse()

	conn, err := grpc.NewClient(*addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		log.Fatalf("connect to %s: %v", *addr, err)
	}
	defer conn.Close()
	client := servingv1.NewGenerateServiceClient(conn)
	ctx := context.Background()

	fmt.Println("== stream ==")
	if err := streamText(ctx, client, *model); err != nil {
		log.Fatalf("generate: %v", err)
	}
	fmt.Println("== invalid request ==")
	invalidRequest(ctx, client, *model)
	fmt.Println("== cancel ==")
	cancelMidway(ctx, client, *model)
	fmt.Println("== deadline ==")
	withDeadline(ctx, client, *model)
}

// streamText prints the text as it arrives, then the usage the last message carries.
func streamText(ctx context.Context, client servingv1.GenerateServiceClient, model string) error {
	stream, err := client.Generate(ctx, &servingv1.GenerateRequest{
		ModelId:     model,
		Prompt:      &servingv1.GenerateRequest_Text{Text: "Once upon a time"},
		MaxTokens:   proto.Uint32(32),
		Temperature: proto.Float32(0.7),
		Seed:        proto.Uint64(42), // the same text every time
	})
	if err != nil {
		return err
	}
	for {
		msg, err := stream.Recv()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		fmt.Print(msg.GetText())
		if msg.GetFinishReason() != servingv1.FinishReason_FINISH_REASON_UNSPECIFIED {
			usage := msg.GetUsage()
			fmt.Printf("\nusage: prompt_tokens=%d completion_tokens=%d finish_reason=%s\n",
				usage.GetPromptTokens(), usage.GetCompletionTokens(), msg.GetFinishReason())
		}
	}
}

// invalidRequest asks for max_tokens 0 and prints the field violations of the rich status.
func invalidRequest(ctx context.Context, client servingv1.GenerateServiceClient, model string) {
	stream, err := client.Generate(ctx, &servingv1.GenerateRequest{
		ModelId:   model,
		Prompt:    &servingv1.GenerateRequest_Text{Text: "Hello"},
		MaxTokens: proto.Uint32(0), // must be at least 1
	})
	if err == nil {
		_, err = stream.Recv() // a server stream's status arrives with the first Recv
	}
	printStatus(err)
}

// cancelMidway stops a long generation after a few messages.
func cancelMidway(ctx context.Context, client servingv1.GenerateServiceClient, model string) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := client.Generate(ctx, &servingv1.GenerateRequest{
		ModelId:   model,
		Prompt:    &servingv1.GenerateRequest_Text{Text: "Tell me a long story"},
		MaxTokens: proto.Uint32(1024),
		IgnoreEos: true,
	})
	if err != nil {
		printStatus(err)
		return
	}
	for received := 1; ; received++ {
		if _, err := stream.Recv(); err != nil {
			printStatus(err)
			return
		}
		if received == 3 {
			fmt.Printf("received %d messages, cancelling\n", received)
			cancel()
		}
	}
}

// withDeadline gives a generation too long for it 200 ms.
func withDeadline(ctx context.Context, client servingv1.GenerateServiceClient, model string) {
	ctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancel()
	stream, err := client.Generate(ctx, &servingv1.GenerateRequest{
		ModelId:   model,
		Prompt:    &servingv1.GenerateRequest_Text{Text: "Tell me a long story"},
		MaxTokens: proto.Uint32(2000),
		IgnoreEos: true,
	})
	if err == nil {
		for err == nil {
			_, err = stream.Recv()
		}
		if err == io.EOF {
			fmt.Println("finished before the deadline")
			return
		}
	}
	printStatus(err)
}

// printStatus prints a status and the google.rpc details it carries, if any.
func printStatus(err error) {
	st, ok := status.FromError(err)
	if !ok {
		log.Fatalf("not a gRPC status: %v", err)
	}
	// code.Code names codes as the other gRPC libraries do: INVALID_ARGUMENT, not InvalidArgument.
	fmt.Printf("status: %s: %s\n", code.Code(st.Code()), st.Message())
	for _, detail := range st.Details() {
		switch d := detail.(type) {
		case *errdetails.BadRequest:
			for _, v := range d.GetFieldViolations() {
				fmt.Printf("field violation: %s: %s\n", v.GetField(), v.GetDescription())
			}
		case *errdetails.ErrorInfo:
			fmt.Printf("error info: reason=%s domain=%s metadata=%v\n", d.GetReason(), d.GetDomain(), d.GetMetadata())
		case *errdetails.RetryInfo:
			fmt.Printf("retry after: %s\n", d.GetRetryDelay().AsDuration())
		}
	}
}

func env(name, fallback string) string {
	if value := os.Getenv(name); value != "" {
		return value
	}
	return fallback
}
