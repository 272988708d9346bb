using System.Text.Json;
using FineTune.Domain;
using Microsoft.AspNetCore.Http.HttpResults;

namespace FineTune.Api.Infrastructure;

/// <summary>Reads a small JSON request body strictly (unknown fields, wrong types, missing required values are errors)
/// and answers a ProblemDetails that names the field by its JSON path.</summary>
public static class JsonBody
{
    public const int MaxBytes = 64 * 1024;

    public static async Task<(T? Value, ProblemHttpResult? Error)> ReadAsync<T>(HttpRequest request, CancellationToken ct) where T : class
    {
        if (request.ContentLength > MaxBytes)
            return (null, TypedResults.Problem($"The request body must be at most {MaxBytes} bytes.", statusCode: 413, title: "Request body too large"));
        if (request.ContentType is { } type && !type.StartsWith("application/json", StringComparison.OrdinalIgnoreCase)
            && !type.Contains("+json", StringComparison.OrdinalIgnoreCase))
            return (null, TypedResults.Problem("Send the request as application/json.", statusCode: 415, title: "Unsupported media type"));
        using var buffer = new MemoryStream();
        var chunk = new byte[8192];
        int read;
        while ((read = await request.Body.ReadAsync(chunk, ct)) > 0)
        {
            if (buffer.Length + read > MaxBytes)
                return (null, TypedResults.Problem($"The request body must be at most {MaxBytes} bytes.", statusCode: 413, title: "Request body too large"));
            buffer.Write(chunk, 0, read);
        }
        if (buffer.Length == 0) return (null, Invalid("$", "the request body is empty; send a JSON object"));
        try
        {
            var value = JsonSerializer.Deserialize<T>(buffer.ToArray(), DomainJson.Strict);
            return value is null ? (null, Invalid("$", "must be a JSON object")) : (value, null);
        }
        catch (JsonException e)
        {
            var path = string.IsNullOrEmpty(e.Path) ? "$" : e.Path;
            var missing = e.Message.Contains("missing required properties", StringComparison.Ordinal);
            var message = e.Message.Contains("could not be mapped", StringComparison.Ordinal) ? "unknown field"
                : missing ? "is required"
                : e.Message.Contains("null", StringComparison.OrdinalIgnoreCase) ? "must not be null"
                : e.Message.Contains("could not be converted", StringComparison.Ordinal) ? "has the wrong type"
                : "is not valid JSON";
            // Messages about a member name it in quotes; the path then ends at its parent.
            var named = missing ? e.Message[e.Message.IndexOf("including:", StringComparison.Ordinal)..] : e.Message;
            if ((missing || message == "unknown field") && Quoted(named) is { Length: > 0 } name && !path.EndsWith(name, StringComparison.Ordinal))
                path = path == "$" ? "$." + name : $"{path}.{name}";
            return (null, Invalid(path, message));
        }
    }

    private static string Quoted(string message)
    {
        var a = message.IndexOf('\'');
        var b = a < 0 ? -1 : message.IndexOf('\'', a + 1);
        return a >= 0 && b > a ? message[(a + 1)..b] : "";
    }

    /// <summary>A 400 (malformed) ProblemDetails naming one field.</summary>
    public static ProblemHttpResult Invalid(string jsonPath, string message)
    {
        var field = jsonPath.StartsWith("$.", StringComparison.Ordinal) ? jsonPath[2..] : jsonPath;
        return TypedResults.Problem(new HttpValidationProblemDetails(new Dictionary<string, string[]> { [field] = [message] })
        {
            Status = 400, Title = "The request body is not valid", Detail = $"{field}: {message}",
        });
    }

    /// <summary>A 422 (well-formed but not acceptable) ProblemDetails listing fields.</summary>
    public static ProblemHttpResult Unprocessable(IDictionary<string, string[]> errors, string title = "The request is not valid",
        IDictionary<string, object?>? extensions = null)
    {
        var problem = new HttpValidationProblemDetails(errors)
        {
            Status = 422, Title = title, Detail = string.Join("; ", errors.Select(kv => $"{kv.Key}: {string.Join(", ", kv.Value)}")),
        };
        if (extensions is not null) foreach (var (k, v) in extensions) problem.Extensions[k] = v;
        return TypedResults.Problem(problem);
    }

    public static ProblemHttpResult Unprocessable(string field, string message, IDictionary<string, object?>? extensions = null) =>
        Unprocessable(new Dictionary<string, string[]> { [field] = [message] }, extensions: extensions);

    public static ProblemHttpResult NotFound(string what) => TypedResults.Problem($"No {what}.", statusCode: 404, title: "Not found");

    public static ProblemHttpResult Conflict(string detail, string title = "Conflict", IDictionary<string, object?>? extensions = null) =>
        TypedResults.Problem(detail, statusCode: 409, title: title, extensions: extensions);
}
