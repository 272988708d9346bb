using System.Diagnostics;
using Microsoft.AspNetCore.Diagnostics;
using Serilog;
using Serilog.Formatting.Compact;

namespace FineTune.Api.Infrastructure;

public static class Observability
{
    /// <summary>Serilog behind Microsoft.Extensions.Logging: levels/enrichers/sinks from "Serilog"; a console sink
    /// (compact JSON when Logging:Json=true) unless "Serilog:WriteTo" names sinks.</summary>
    public static void AddFineTuneLogging(this WebApplicationBuilder builder)
    {
        var config = new LoggerConfiguration()
            .ReadFrom.Configuration(builder.Configuration)
            .Enrich.FromLogContext();
        if (!builder.Configuration.GetSection("Serilog:WriteTo").Exists())
            config = builder.Configuration.GetValue<bool>("Logging:Json")
                ? config.WriteTo.Console(new CompactJsonFormatter())
                : config.WriteTo.Console(outputTemplate: "[{Timestamp:HH:mm:ss} {Level:u3}] {SourceContext}: {Message:lj} {Properties:j}{NewLine}{Exception}");
        builder.Logging.ClearProviders();
        builder.Logging.AddSerilog(config.CreateLogger(), dispose: true);
    }

    /// <summary>One line per request: method, path, status, elapsed.</summary>
    public static IApplicationBuilder UseRequestLogging(this IApplicationBuilder app) => app.Use(async (ctx, next) =>
    {
        var log = ctx.RequestServices.GetRequiredService<ILoggerFactory>().CreateLogger("FineTune.Api.Requests");
        var started = Stopwatch.GetTimestamp();
        var status = 500; // what the exception handler outside will answer if next throws
        try
        {
            await next(ctx);
            status = ctx.Response.StatusCode;
        }
        finally
        {
            log.LogInformation("{Method} {Path} → {StatusCode} in {ElapsedMs:0.0} ms", ctx.Request.Method, ctx.Request.Path,
                status, Stopwatch.GetElapsedTime(started).TotalMilliseconds);
        }
    });
}

/// <summary>Real bugs become a bare 500 ProblemDetails (details only in the log); a body the server itself refused
/// (too large, malformed) keeps its 4xx.</summary>
public sealed class ProblemExceptionHandler(ILogger<ProblemExceptionHandler> log) : IExceptionHandler
{
    public async ValueTask<bool> TryHandleAsync(HttpContext ctx, Exception exception, CancellationToken ct)
    {
        if (exception is BadHttpRequestException bad)
        {
            await TypedResults.Problem(bad.Message, statusCode: bad.StatusCode, title: "Bad request").ExecuteAsync(ctx);
            return true;
        }
        if (exception is OperationCanceledException && ctx.RequestAborted.IsCancellationRequested) return true;
        log.LogError(exception, "Unhandled error on {Method} {Path}", ctx.Request.Method, ctx.Request.Path);
        await TypedResults.Problem("An unexpected error occurred. It has been logged; try again later.",
            statusCode: 500, title: "Internal server error", extensions: new Dictionary<string, object?> { ["traceId"] = ctx.TraceIdentifier })
            .ExecuteAsync(ctx);
        return true;
    }
}
