using System.ComponentModel;
using System.Reflection;
using System.Text.Json;
using System.Text.Json.Nodes;
using FineTune.Domain;
using FineTune.Api.Submission;
using FineTune.Domain.Methods;
using Microsoft.OpenApi;
using Swashbuckle.AspNetCore.SwaggerGen;

namespace FineTune.Api.Infrastructure;

public static class OpenApi
{
    public static IServiceCollection AddFineTuneOpenApi(this IServiceCollection services)
    {
        services.AddEndpointsApiExplorer();
        services.AddSwaggerGen(c =>
        {
            c.SwaggerDoc("v1", new OpenApiInfo
            {
                Title = "Fine-tune API", Version = "v1",
                Description = "Submit LoRA/Bone fine-tunes of Llama-family models, follow them, and pull the adapters from a per-task registry "
                    + "(versions, aliases, lineage, ranged downloads). Tenants with quotas and fair sharing; signed webhooks; an audit log.",
            });
            c.AddSecurityDefinition("bearer", new OpenApiSecurityScheme
            {
                Type = SecuritySchemeType.Http, Scheme = "bearer", BearerFormat = "ft_<32 characters>",
                Description = "An API key: Authorization: Bearer ft_…",
            });
            c.AddSecurityRequirement(doc => new OpenApiSecurityRequirement { [new OpenApiSecuritySchemeReference("bearer", doc)] = [] });
            // The method union: oneOf LoraMethod | BoneMethod with discriminator "type" (from the JsonDerivedType attributes).
            c.UseOneOfForPolymorphism();
            c.SelectDiscriminatorNameUsing(t => t == typeof(MethodSpec) ? "type" : null);
            c.SupportNonNullableReferenceTypes();
            foreach (var xml in new[] { "FineTune.Api.xml", "FineTune.Domain.xml" }.Select(f => Path.Combine(AppContext.BaseDirectory, f)).Where(File.Exists))
                c.IncludeXmlComments(xml, includeControllerXmlComments: true);
            c.OperationFilter<SubmitExamples>();
            c.OperationFilter<EndpointExamplesFilter>();
        });
        return services;
    }

    /// <summary>Request examples for the submit operation, one per method.</summary>
    private sealed class SubmitExamples : IOperationFilter
    {
        public void Apply(OpenApiOperation operation, OperationFilterContext context)
        {
            if (operation.OperationId != "CreateFineTune" || operation.RequestBody?.Content is null
                || !operation.RequestBody.Content.TryGetValue("application/json", out var media)) return;
            media.Examples ??= new Dictionary<string, IOpenApiExample>();
            // One example per registered method, from its options type's defaults (so a new method documents itself).
            foreach (var (type, optionsType) in MethodSpec.Registered)
            {
                var method = JsonSerializer.SerializeToNode(MethodSpec.Default(type), DomainJson.Options)!.AsObject();
                if (!method.ContainsKey("type")) method.Insert(0, "type", type);
                var summary = optionsType.GetCustomAttribute<DescriptionAttribute>()?.Description ?? type;
                media.Examples[type] = new OpenApiExample
                {
                    Summary = $"{type}: {summary}",
                    Value = new JsonObject
                    {
                        ["model"] = "tiny-llama",
                        ["trainingData"] = "file:///data/datasets/chat.jsonl",
                        ["method"] = method,
                        ["hyperparameters"] = new JsonObject { ["epochs"] = 1, ["batchSize"] = 4, ["learningRate"] = 0.0002, ["maxSeqLength"] = 512, ["seed"] = 42 },
                        ["adapterName"] = $"support-bot-{type}",
                        ["pool"] = "cpu",
                    },
                };
            }
        }
    }
}
