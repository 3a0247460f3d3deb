package dev.mlxserving.example;

import com.google.protobuf.Any;
import com.google.protobuf.InvalidProtocolBufferException;
import com.google.rpc.BadRequest;
import com.google.rpc.ErrorInfo;
import dev.mlxserving.v1.FinishReason;
import dev.mlxserving.v1.GenerateRequest;
import dev.mlxserving.v1.GenerateResponse;
import dev.mlxserving.v1.GenerateServiceGrpc;
import dev.mlxserving.v1.GenerateServiceGrpc.GenerateServiceBlockingStub;
import dev.mlxserving.v1.Usage;
import io.grpc.Context;
import io.grpc.Grpc;
import io.grpc.InsecureChannelCredentials;
import io.grpc.ManagedChannel;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.protobuf.StatusProto;
import java.util.Iterator;
import java.util.concurrent.TimeUnit;

/**
 * An example client of mlx-serving's GenerateService: streaming, usage, rich errors, cancellation
 * and deadlines.
 *
 * <pre>java -jar target/mlx-serving-client-example.jar --addr localhost:50051 --model tiny-llama</pre>
 */
public final class GenerateClient {
  public static void main(String[] args) throws Exception {
    String addr = env("MLX_SERVING_ADDR", "localhost:50051");
    String model = env("MLX_SERVING_MODEL", "tiny-llama");
    for (int i = 0; i + 1 < args.length; i += 2) {
      switch (args[i]) {
        case "--addr" -> addr = args[i + 1];
        case "--model" -> model = args[i + 1];
        default -> throw new IllegalArgumentException("unknown argument " + args[i]);
      }
    }

    ManagedChannel channel =
        Grpc.newChannelBuilder(addr, InsecureChannelCredentials.create()).build();
    try {
      GenerateServiceBlockingStub stub = GenerateServiceGrpc.newBlockingStub(channel);
      System.out.println("== stream ==");
      streamText(stub, model);
      System.out.println("== invalid request ==");
      invalidRequest(stub, model);
      System.out.println("== cancel ==");
      cancelMidway(stub, model);
      System.out.println("== deadline ==");
      withDeadline(stub, model);
    } finally {
      channel.shutdownNow().awaitTermination(5, TimeUnit.SECONDS);
    }
  }

  /** Prints the text as it arrives, then the usage the last message carries. */
  static void streamText(GenerateServiceBlockingStub stub, String model) {
    GenerateRequest request =
        GenerateRequest.newBuilder()
            .setModelId(model)
            .setText("Once upon a time")
            .setMaxTokens(32)
            .setTemperature(0.7f)
            .setSeed(42) // the same text every time
            .build();
    Iterator<GenerateResponse> stream = stub.generate(request);
    while (stream.hasNext()) {
      GenerateResponse message = stream.next();
      System.out.print(message.getText());
      System.out.flush();
      if (message.getFinishReason() != FinishReason.FINISH_REASON_UNSPECIFIED) {
        Usage usage = message.getUsage();
        System.out.printf(
            "%nusage: prompt_tokens=%d completion_tokens=%d finish_reason=%s%n",
            usage.getPromptTokens(), usage.getCompletionTokens(), message.getFinishReason());
      }
    }
  }

  /** Asks for max_tokens 0 and prints the field violations of the rich status. */
  static void invalidRequest(GenerateServiceBlockingStub stub, String model) {
    GenerateRequest request =
        GenerateRequest.newBuilder()
            .setModelId(model)
            .setText("Hello")
            .setMaxTokens(0) // must be at least 1
            .build();
    try {
      stub.generate(request).forEachRemaining(message -> {});
    } catch (StatusRuntimeException e) {
      printStatus(e);
    }
  }

  /** Stops a long generation after a few messages. */
  static void cancelMidway(GenerateServiceBlockingStub stub, String model) {
    GenerateRequest request =
        GenerateRequest.newBuilder()
            .setModelId(model)
            .setText("Tell me a long story")
            .setMaxTokens(1024)
            .setIgnoreEos(true)
            .build();
    // A call started inside a cancellable context is cancelled with it.
    Context.CancellableContext context = Context.current().withCancellation();
    context.run(
        () -> {
          try {
            Iterator<GenerateResponse> stream = stub.generate(request);
            for (int received = 1; stream.hasNext(); received++) {
              stream.next();
              if (received == 3) {
                System.out.printf("received %d messages, cancelling%n", received);
                context.cancel(null);
              }
            }
          } catch (StatusRuntimeException e) {
            printStatus(e);
          }
        });
  }

  /** Gives a generation too long for it 200 ms. */
  static void withDeadline(GenerateServiceBlockingStub stub, String model) {
    GenerateRequest request =
        GenerateRequest.newBuilder()
            .setModelId(model)
            .setText("Tell me a long story")
            .setMaxTokens(2000)
            .setIgnoreEos(true)
            .build();
    try {
      stub.withDeadlineAfter(200, TimeUnit.MILLISECONDS)
          .generate(request)
          .forEachRemaining(message -> {});
      System.out.println("finished before the deadline");
    } catch (StatusRuntimeException e) {
      printStatus(e);
    }
  }

  /** Prints a status and the google.rpc details its trailers carry, if any. */
  static void printStatus(StatusRuntimeException e) {
    Status status = e.getStatus();
    System.out.printf("status: %s: %s%n", status.getCode(), status.getDescription());
    com.google.rpc.Status details = StatusProto.fromThrowable(e);
    if (details == null) {
      return;
    }
    for (Any detail : details.getDetailsList()) {
      try {
        if (detail.is(BadRequest.class)) {
          for (BadRequest.FieldViolation v : detail.unpack(BadRequest.class).getFieldViolationsList()) {
            System.out.printf("field violation: %s: %s%n", v.getField(), v.getDescription());
          }
        } else if (detail.is(ErrorInfo.class)) {
          ErrorInfo info = detail.unpack(ErrorInfo.class);
          System.out.printf(
              "error info: reason=%s domain=%s metadata=%s%n",
              info.getReason(), info.getDomain(), info.getMetadataMap());
        }
      } catch (InvalidProtocolBufferException ignored) {
        // A detail this client cannot read: skip it.
      }
    }
  }

  private static String env(String name, String fallback) {
    String value = System.getenv(name);
    return value == null || value.isEmpty() ? fallback : value;
  }

  private GenerateClient() {}
}
