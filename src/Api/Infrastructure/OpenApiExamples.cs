using System.Text.Json;
using System.Text.Json.Nodes;
using FineTune.Api.Endpoints;
using FineTune.Api.Tenancy;
using FineTune.Api.Webhooks;
using FineTune.Domain;
using FineTune.Domain.Adapters;
using FineTune.Domain.Dispatch;
using FineTune.Domain.Jobs;
using FineTune.Domain.Methods;
using FineTune.Domain.Tenants;
using FineTune.Domain.Webhooks;
using Microsoft.OpenApi;
using Swashbuckle.AspNetCore.SwaggerGen;

namespace FineTune.Api.Infrastructure;

/// <summary>A request and/or response example for an endpoint's OpenAPI operation (serialized as the API serializes).</summary>
public sealed record OpenApiExampleMetadata(object? Request, object? Response);

public static class OpenApiExampleExtensions
{
    /// <summary>Documents the endpoint with examples; with neither (a file download, a 204), it states there is no JSON to show.</summary>
    public static TBuilder WithExamples<TBuilder>(this TBuilder builder, object? request = null, object? response = null)
        where TBuilder : IEndpointConventionBuilder => builder.WithMetadata(new OpenApiExampleMetadata(request, response));
}

/// <summary>Puts each endpoint's <see cref="OpenApiExampleMetadata"/> on its request body and its 2xx JSON responses.</summary>
public sealed class EndpointExamplesFilter : IOperationFilter
{
    public void Apply(OpenApiOperation operation, OperationFilterContext context)
    {
        var meta = context.ApiDescription.ActionDescriptor.EndpointMetadata.OfType<OpenApiExampleMetadata>().LastOrDefault();
        if (meta is null) return;
        if (meta.Request is not null && operation.RequestBody?.Content is { } body && body.TryGetValue("application/json", out var media))
            media.Example = JsonSerializer.SerializeToNode(meta.Request, meta.Request.GetType(), DomainJson.Options);
        if (meta.Response is not null && operation.Responses is not null)
            foreach (var (code, response) in operation.Responses)
                if (code.StartsWith('2') && response.Content is { } content && content.TryGetValue("application/json", out var json))
                    json.Example = JsonSerializer.SerializeToNode(meta.Response, meta.Response.GetType(), DomainJson.Options);
    }
}

/// <summary>Sample values for the documentation: one of each resource, consistent with each other.</summary>
public static class Examples
{
    public static readonly DateTimeOffset At = new(2026, 11, 30, 14, 5, 0, TimeSpan.Zero);
    private static readonly Guid TenantId = Guid.Parse("0193a1f2-6c3b-7d40-9a1e-3f1c2b4d5e60");
    private static readonly Guid JobId = Guid.Parse("0193a1f2-7d11-7a20-8b3c-9e8d7c6b5a40");
    private static readonly Guid AdapterId = Guid.Parse("0193a1f3-0a2b-7c3d-8e4f-5a6b7c8d9e01");
    private static readonly Guid KeyId = Guid.Parse("0193a1f2-6c3b-7d40-9a1e-3f1c2b4d5e61");
    private static readonly Guid WebhookId = Guid.Parse("0193a1f4-1b2c-7d3e-8f40-a1b2c3d4e5f6");

    public static readonly QuotasDto Quotas = new(MaxRunningJobs: 2, MaxQueuedJobs: 20, MaxSubmissionsPerMinute: 30,
        AllowedPools: ["gpu"], MaxDatasetBytes: 1L << 30, MaxStepsPerJob: 20_000, MaxTokensPerJob: 200_000_000, MaxPriority: "normal");

    public static readonly TenantDto Tenant = new(TenantId, "team-search", At, Quotas, new UsageDto(1, 3, 2));

    public static readonly KeyDto Key = new(KeyId, TenantId, "ft_7Hq2x", Roles.Member, "ci", At, null, null, true);

    public static readonly CreatedKeyDto CreatedKey = new(KeyId, TenantId, "ft_7Hq2x", Roles.Member, "ci", At,
        DateTimeOffset.Parse("2027-01-01T00:00:00Z"), "ft_7Hq2xR4mP9sV1kL8nB3cD6fG0hJ5tY2wQ");

    public static readonly AuditEventDto Audit = new(42, At, TenantId, KeyId, TenantId, Roles.Member, "alias.moved", "alias",
        "support-bot@production", JsonDocument.Parse("""{"task":"support-bot","alias":"production","fromVersion":1,"toVersion":2}""").RootElement);

    public static readonly JobDto Job = new(JobId, JobStatus.Queued, "llama-3.2-1b", "file:///data/datasets/support.jsonl", null,
        MethodSpec.Default("bone"), new Hyperparameters(), "support-bot", "gpu", "normal", new ProgressDto(0, 0), null, null, null,
        false, 0, At, null, null, false, new QueueInfo(3, At.AddMinutes(25), FairQueue.WaitingForSlot));

    private static readonly List<AdapterFile> Files =
    [
        new("adapter_config.json", 512, "5f1d0c8e2b7a4c3e9d6f8a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f"),
        new("adapter_model.safetensors", 8_392_704, "9a8b7c6d5e4f30211f2e3d4c5b6a79880a1b2c3d4e5f60718293a4b5c6d7e8f9"),
        new("lora/adapter_config.json", 498, "0c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f"),
        new("lora/adapter_model.safetensors", 16_785_408, "7e8f90a1b2c3d4e5f60718293a4b5c6d0c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f"),
        new("metadata.json", 2_048, "d4e5f60718293a4b5c6d7e8f90a1b2c30c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f"),
    ];

    public static readonly AdapterDto Adapter = AdapterDto.From(new Adapter
    {
        Id = AdapterId, TenantId = TenantId, Name = "support-bot", Version = 2, JobId = JobId, MethodType = "bone",
        BaseModel = "llama-3.2-1b", Path = "adapters/team-search/support-bot/v2", Files = Files, CreatedAt = At,
        Metadata = new() { ["steps"] = 1200, ["tokens_seen"] = 9_830_400, ["final_loss"] = 1.23 },
        Tags = ["reviewed"], Method = """{"type":"bone","r":64}""", Hyperparameters = """{"epochs":2,"batchSize":8,"learningRate":0.0002}""",
        BaseModelSha256 = "3c1b2a09f8e7d6c5b4a39281706f5e4d3c2b1a09f8e7d6c5b4a39281706f5e4d",
        DatasetUri = "file:///data/datasets/support.jsonl", DatasetSha256 = "b4a39281706f5e4d3c2b1a09f8e7d6c53c1b2a09f8e7d6c5b4a39281706f5e4d",
        FinalLoss = 1.23, FinalValidationLoss = 1.31, SizeBytes = Files.Sum(f => f.Size),
    }, ["production"]);

    public static readonly AliasDto Alias = new("support-bot", "production", 2, AdapterId, At, KeyId);

    public static readonly TaskDto Task = new("support-bot", 2, 2, new Dictionary<string, int> { ["production"] = 2, ["staging"] = 2 }, At);

    private static readonly List<FineTune.Domain.Models.ModuleShape> LlamaModules =
    [
        new("q_proj", 2048, 2048), new("k_proj", 512, 2048), new("v_proj", 512, 2048), new("o_proj", 2048, 2048),
        new("gate_proj", 8192, 2048), new("up_proj", 8192, 2048), new("down_proj", 2048, 8192),
    ];

    public static readonly FineTune.Api.BaseModels.RegisterBaseModelRequest RegisterBaseModel =
        new("llama-3.2-1b", "file:///data/models/Llama-3.2-1B", "9c6f0d0b6e4f3c2a1b0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a39281706f5e4");

    public static readonly BaseModelDto BaseModel = new("llama-3.2-1b", "file:///data/models/Llama-3.2-1B", RegisterBaseModel.Sha256,
        "LlamaForCausalLM", "llama", 2048, 16, 128256, 8192, 32, 8, LlamaModules, 2_471_645_608, "api", At);

    public static readonly BaseModelSummaryDto BaseModelSummary = new("llama-3.2-1b", "LlamaForCausalLM", 2048, 16, 128256, LlamaModules);

    public static readonly WebhookDto Webhook = new(WebhookId, "https://hooks.example.com/finetune",
        [WebhookEvents.JobSucceeded, WebhookEvents.AliasMoved], "deploy bot", true, At, At);

    public static readonly CreatedWebhookDto CreatedWebhook = new(WebhookId, Webhook.Url, Webhook.Events, Webhook.Description, true, At,
        "whsec_Z3p9L2kq8WmX4rT6yB1nC5vD7fH0jS2aQ4eR6tY8");

    public static readonly DeliveryDto Delivery = new(Guid.Parse("0193a1f5-2c3d-7e4f-9a01-b2c3d4e5f6a7"), WebhookId,
        Guid.Parse("5b6c7d8e-9f0a-4b1c-8d2e-3f4a5b6c7d8e"), WebhookEvents.AliasMoved, DeliveryStatus.Delivered, 2, At, null, At.AddSeconds(11), 200, null,
        JsonDocument.Parse("""{"id":"5b6c7d8e-9f0a-4b1c-8d2e-3f4a5b6c7d8e","type":"alias.moved","createdAt":"2026-11-30T14:05:00Z","data":{"task":"support-bot","alias":"production","version":2,"previousVersion":1}}""").RootElement,
        JsonDocument.Parse("""[{"attempt":1,"statusCode":503,"error":"HTTP 503","durationMs":41.2},{"attempt":2,"statusCode":200,"error":null,"durationMs":12.9}]""").RootElement);

    public static JsonNode? Node(object value) => JsonSerializer.SerializeToNode(value, value.GetType(), DomainJson.Options);
}
