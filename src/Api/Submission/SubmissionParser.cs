using System.Security.Cryptography;
using System.Text.Json;
using System.Text.RegularExpressions;
using FineTune.Api.Infrastructure;
using FineTune.Domain;
using FineTune.Domain.Datasets;
using FineTune.Domain.Jobs;
using FineTune.Domain.Methods;

namespace FineTune.Api.Submission;

/// <summary>A request that passed every check, with what the job row needs.</summary>
public sealed record ValidSubmission(CreateFineTuneRequest Request, Hyperparameters Hyperparameters, string Pool,
    string Priority, string ModelPath, string RequestHash)
{
    public string? ModelUri { get; init; }
    public string? ModelSha256 { get; init; }
    public DatasetSummary? Training { get; init; }
    public DatasetSummary? Validation { get; init; }
    public JobEstimate? Estimate { get; init; }
}

/// <summary>Why a request was refused: HTTP status, a summary, and errors keyed by the request's JSON path.</summary>
/// <param name="Extensions">Extra problem members, e.g. <c>datasetErrors</c> with the line numbers of bad lines.</param>
public sealed record SubmissionError(int Status, string Title, string Detail, IDictionary<string, string[]> Errors,
    IDictionary<string, object?>? Extensions = null);

/// <summary>Reads and validates a submission before anything is stored. Never throws for bad input.</summary>
public sealed partial class SubmissionParser(SubmissionOptions options, ModelResolver models, DatasetCheck datasets)
{
    [GeneratedRegex("^[a-z0-9][a-z0-9._-]{0,63}$")] private static partial Regex AdapterNamePattern();

    /// <summary>Reads at most the configured number of bytes: larger bodies are refused without reading them whole.</summary>
    public async Task<(byte[]? Body, SubmissionError? Error)> ReadBodyAsync(HttpRequest request, CancellationToken ct)
    {
        var limit = options.MaxRequestBodyBytes;
        if (request.ContentLength > limit) return (null, TooLarge(limit));
        if (request.ContentType is { } type && !type.StartsWith("application/json", StringComparison.OrdinalIgnoreCase)
            && !type.Contains("+json", StringComparison.OrdinalIgnoreCase))
            return (null, new(415, "Unsupported media type", "Send the request as application/json.", new Dictionary<string, string[]>()));
        using var buffer = new MemoryStream();
        var chunk = new byte[16 * 1024];
        int read;
        while ((read = await request.Body.ReadAsync(chunk, ct)) > 0)
        {
            if (buffer.Length + read > limit) return (null, TooLarge(limit));
            buffer.Write(chunk, 0, read);
        }
        return (buffer.ToArray(), null);
    }

    /// <summary>Deserializes strictly and fills in defaults; the result's hash is the idempotency fingerprint.</summary>
    public (CreateFineTuneRequest? Request, string? Hash, SubmissionError? Error) Read(byte[] body)
    {
        var (request, error) = Deserialize(body);
        if (error is not null) return (null, null, error);
        var r = request! with
        {
            Hyperparameters = request.Hyperparameters ?? new Hyperparameters(),
            Pool = request.Pool ?? options.Pools[0],
            Priority = request.Priority ?? Priorities.Normal,
        };
        return (r, Hash(r), null);
    }

    /// <summary>Every check that needs no database: ranges, names, the model's shapes, the datasets.</summary>
    public async Task<(ValidSubmission? Submission, SubmissionError? Error)> ValidateAsync(CreateFineTuneRequest r, string hash, CancellationToken ct)
    {
        var hp = r.Hyperparameters!;
        var pool = r.Pool!;
        var priority = r.Priority!;

        var errors = new Dictionary<string, List<string>>();
        void Add(string field, string error) =>
            (errors.TryGetValue(field, out var list) ? list : errors[field] = []).Add(error);

        foreach (var (f, e) in r.Method.Validate()) Add(f, e);
        foreach (var (f, e) in hp.Validate()) Add(f, e);
        foreach (var (f, e) in r.Method.ValidateWith(hp)) Add(f, e);
        if (!AdapterNamePattern().IsMatch(r.AdapterName))
            Add("adapterName", "must match ^[a-z0-9][a-z0-9._-]{0,63}$ (lowercase letters, digits, '.', '_', '-')");
        if (!options.Pools.Contains(pool)) Add("pool", $"unknown pool '{pool}'; available: {string.Join(", ", options.Pools)}");
        if (!Priorities.All.Contains(priority)) Add("priority", "must be one of: low, normal, high");

        if (r.ValidationData is not null && hp.ValidationSplit > 0)
            Add("hyperparameters.validationSplit", "must be 0 when validationData is given (the split holds out training examples instead)");

        var (model, modelError) = await models.ResolveAsync(r.Model, ct);
        if (modelError is not null) Add("model", modelError);
        else
        {
            if (model!.TokenizerError is not null) Add("model", model.TokenizerError);
            if (!errors.Keys.Any(k => k.StartsWith("method.", StringComparison.Ordinal)))
                foreach (var (f, e) in r.Method.ValidateShapes(model.Config.LayerLinears())) Add(f, e);
        }

        // Token counts need valid sequence settings; the lines are checked in any case.
        var tokenizer = errors.ContainsKey("hyperparameters.maxSeqLength") || errors.ContainsKey("hyperparameters.truncation") ? null : model?.Tokenizer;
        var lineErrors = new Dictionary<string, object?>();
        async Task<DatasetSummary?> Check(string field, string reference)
        {
            var outcome = await datasets.CheckAsync(reference, tokenizer, model?.Config.VocabSize, hp, ct);
            foreach (var e in outcome.Errors) Add(field, e);
            if (outcome.Lines is not null) lineErrors[field] = outcome.Lines;
            return outcome.Summary;
        }
        var training = await Check("trainingData", r.TrainingData);
        var validation = r.ValidationData is null ? null : await Check("validationData", r.ValidationData);
        if (hp.ValidationSplit > 0 && training is { Examples: < 2 } && !errors.ContainsKey("trainingData"))
            Add("hyperparameters.validationSplit", $"needs at least 2 training examples to hold some out; the dataset has {training.Examples}");

        if (errors.Count > 0)
            return (null, new(StatusCodes.Status422UnprocessableEntity, "The request is not valid",
                string.Join("; ", errors.Select(kv => $"{kv.Key}: {string.Join(", ", kv.Value.Take(3))}{(kv.Value.Count > 3 ? ", …" : "")}")),
                errors.ToDictionary(kv => kv.Key, kv => kv.Value.ToArray()),
                lineErrors.Count > 0 ? new Dictionary<string, object?> { ["datasetErrors"] = lineErrors } : null));

        return (new ValidSubmission(r, hp, pool, priority, model!.Folder, hash)
        {
            ModelUri = model.Uri, ModelSha256 = model.Sha256, Training = training, Validation = validation,
            Estimate = JobEstimate.For(training!, hp, r.ValidationData is not null,
                options.TokensPerSecond.TryGetValue(pool, out var tps) ? tps : null),
        }, null);
    }

    /// <summary>Strict deserialization of a request body (a submission or another request type), with field-named
    /// errors; <paramref name="precheck"/> looks at the parsed object first (a submission's method type).</summary>
    public static (T? Value, SubmissionError? Error) ReadStrict<T>(byte[] body, Func<JsonElement, SubmissionError?>? precheck = null)
        where T : class
    {
        if (body.Length == 0) return (null, BadRequest("$", "the request body is empty; send a JSON object"));
        JsonDocument doc;
        try
        {
            doc = JsonDocument.Parse(body);
        }
        catch (JsonException e)
        {
            // Reader messages name positions, not types: safe and useful as they are.
            return (null, BadRequest("$", $"is not valid JSON: {e.Message}"));
        }
        using var _ = doc;
        try
        {
            if (doc.RootElement.ValueKind != JsonValueKind.Object) return (null, BadRequest("$", "must be a JSON object"));
            if (precheck?.Invoke(doc.RootElement) is { } error) return (null, error);
            var value = doc.Deserialize<T>(DomainJson.Strict);
            return value is null ? (null, BadRequest("$", "must be a JSON object")) : (value, null);
        }
        catch (JsonException e)
        {
            return (null, FromJsonException(e));
        }
    }

    /// <summary>The idempotency fingerprint: the normalised request (defaults filled in), so formatting does not matter.</summary>
    public static string Hash(CreateFineTuneRequest r) =>
        Convert.ToHexStringLower(SHA256.HashData(JsonSerializer.SerializeToUtf8Bytes(r, DomainJson.Options)));

    private static (CreateFineTuneRequest?, SubmissionError?) Deserialize(byte[] body) =>
        ReadStrict<CreateFineTuneRequest>(body, CheckMethodType);

    /// <summary>The method's type is checked first: an unknown or missing discriminator deserves a message naming it.</summary>
    private static SubmissionError? CheckMethodType(JsonElement root)
    {
        if (!root.TryGetProperty("method", out var method)) return null;
        if (method.ValueKind != JsonValueKind.Object) return BadRequest("$.method", "must be an object with a \"type\"");
        if (!method.TryGetProperty("type", out var type) || type.ValueKind != JsonValueKind.String)
            return BadRequest("$.method.type", $"is required: one of {string.Join(", ", MethodSpec.KnownTypes)}");
        if (!MethodSpec.KnownTypes.Contains(type.GetString()))
            return BadRequest("$.method.type", $"unknown method type '{type.GetString()}'; known: {string.Join(", ", MethodSpec.KnownTypes)}");
        return null;
    }

    /// <summary>Turns System.Text.Json's messages (which name .NET types) into ones about the request's fields.</summary>
    private static SubmissionError FromJsonException(JsonException e)
    {
        var path = string.IsNullOrEmpty(e.Path) ? "$" : e.Path;
        var m = e.Message;
        if (m.Contains("missing required properties", StringComparison.Ordinal))
        {
            var names = RequiredNames().Matches(m[m.IndexOf("including:", StringComparison.Ordinal)..]).Select(x => x.Groups[1].Value).ToList();
            var prefix = path == "$" ? "" : path[2..] + ".";
            var errors = names.ToDictionary(n => prefix + n, _ => new[] { "is required" });
            return new(400, "The request body is not valid",
                $"missing required field(s): {string.Join(", ", errors.Keys)}", errors);
        }
        string message;
        if (m.Contains("could not be mapped to any .NET member", StringComparison.Ordinal))
        {
            var name = QuotedName().Match(m).Groups[1].Value;
            if (name.Length > 0 && !path.EndsWith("." + name, StringComparison.Ordinal)) path = path == "$" ? "$." + name : $"{path}.{name}";
            message = "unknown field";
        }
        else if (m.Contains("null values", StringComparison.Ordinal) || m.Contains("non-nullable", StringComparison.OrdinalIgnoreCase))
            message = "must not be null";
        else if (ConvertedTo().Match(m) is { Success: true } conv)
            message = conv.Groups[1].Value.TrimEnd('.') switch
            {
                "System.Int32" or "System.Int64" or "System.Nullable`1[System.Int32]" => "must be an integer",
                "System.Double" or "System.Nullable`1[System.Double]" => "must be a number",
                "System.Boolean" => "must be true or false",
                "System.String" => "must be a string",
                "System.String[]" => "must be an array of strings",
                _ => "has the wrong type",
            };
        else message = "has the wrong type or an invalid value";
        return BadRequest(path, message, e.LineNumber is { } line ? $" (line {line + 1})" : "");
    }

    [GeneratedRegex("'([^']+)'")] private static partial Regex RequiredNames();
    [GeneratedRegex(@"could not be converted to ([\w.`\[\]]+)")] private static partial Regex ConvertedTo();
    [GeneratedRegex("The JSON property '([^']+)'")] private static partial Regex QuotedName();

    private static SubmissionError BadRequest(string jsonPath, string message, string where = "")
    {
        var field = jsonPath == "$" ? "$" : jsonPath.StartsWith("$.", StringComparison.Ordinal) ? jsonPath[2..] : jsonPath;
        return new(400, "The request body is not valid", $"{field}: {message}{where}",
            new Dictionary<string, string[]> { [field] = [message] });
    }

    private static SubmissionError TooLarge(long limit) =>
        new(413, "Request body too large", $"The request body must be at most {limit} bytes.", new Dictionary<string, string[]>());
}
