using FineTune.Api.BaseModels;
using FineTune.Api.Infrastructure;
using FineTune.Api.Submission;
using FineTune.Domain.Models;
using FineTune.Domain.Persistence;
using Microsoft.AspNetCore.Http.HttpResults;
using Microsoft.EntityFrameworkCore;

namespace FineTune.Api.Endpoints;

/// <summary>A registered base model as administrators see it.</summary>
public sealed record BaseModelDto(string Name, string Uri, string? Sha256, string Architecture, string ModelType, int HiddenSize,
    int NumLayers, int VocabSize, int IntermediateSize, int NumAttentionHeads, int NumKeyValueHeads,
    IReadOnlyList<ModuleShape> Modules, long? WeightsBytes, string Source, DateTimeOffset CreatedAt)
{
    public static BaseModelDto From(BaseModel m) => new(m.Name, m.Uri, m.Sha256, m.Architecture, m.ModelType, m.HiddenSize,
        m.NumLayers, m.VocabSize, m.IntermediateSize, m.NumAttentionHeads, m.NumKeyValueHeads, m.Modules, m.WeightsBytes,
        m.Source, m.CreatedAt);
}

/// <summary>A base model as every tenant sees it: the name to put in a job's <c>model</c>, and its shapes (no URI).</summary>
public sealed record BaseModelSummaryDto(string Name, string Architecture, int HiddenSize, int NumLayers, int VocabSize,
    IReadOnlyList<ModuleShape> Modules)
{
    public static BaseModelSummaryDto From(BaseModel m) => new(m.Name, m.Architecture, m.HiddenSize, m.NumLayers, m.VocabSize, m.Modules);
}

public static class BaseModelsEndpoints
{
    public static IEndpointRouteBuilder MapBaseModels(this IEndpointRouteBuilder app)
    {
        var admin = app.MapGroup("/v1/admin/base-models").WithTags("Base models (admin)").RequireAdmin();
        admin.MapPost("/", Register).Accepts<RegisterBaseModelRequest>("application/json")
            .Produces<BaseModelDto>(StatusCodes.Status201Created)
            .ProducesValidationProblem(StatusCodes.Status400BadRequest).ProducesValidationProblem(StatusCodes.Status422UnprocessableEntity)
            .ProducesProblem(StatusCodes.Status409Conflict)
            .WithName("RegisterBaseModel").WithSummary("Register a base model name")
            .WithExamples(request: Examples.RegisterBaseModel, response: Examples.BaseModel)
            .WithDescription("Reads the model's config.json and tokenizer (an https:// model's small files are fetched into the model cache; "
                + "its weights are fetched by the worker), records the shapes, and for a file:// model hashes the weights.");
        admin.MapGet("/", ListAll).WithExamples(response: new[] { Examples.BaseModel }).WithName("ListBaseModelsAdmin").WithSummary("Registered base models, with URIs and checksums");
        admin.MapGet("/{name}", GetOne).WithExamples(response: Examples.BaseModel).WithName("GetBaseModel").WithSummary("One registered base model");
        admin.MapDelete("/{name}", Delete).WithExamples().WithName("DeleteBaseModel").WithSummary("Remove a base model name")
            .WithDescription("Jobs already submitted keep their model. Names seeded from the Models configuration are removed there.");
        app.MapGroup("/v1/base-models").WithTags("Base models").RequireReader()
            .MapGet("/", ListNames).WithExamples(response: new[] { Examples.BaseModelSummary }).WithName("ListBaseModels").WithSummary("Base model names a job's model may use");
        return app;
    }

    private static async Task<Results<Created<BaseModelDto>, ProblemHttpResult>> Register(
        HttpRequest http, SubmissionParser parser, BaseModelRegistry registry, CancellationToken ct)
    {
        var (body, bodyError) = await parser.ReadBodyAsync(http, ct);
        if (bodyError is not null) return FineTunesEndpoints.Problem(bodyError);
        var (request, readError) = SubmissionParser.ReadStrict<RegisterBaseModelRequest>(body!);
        if (readError is not null) return FineTunesEndpoints.Problem(readError);
        try
        {
            var (model, error) = await registry.RegisterAsync(request!, ct);
            if (error is not null) return FineTunesEndpoints.Problem(error);
            return TypedResults.Created($"/v1/admin/base-models/{model!.Name}", BaseModelDto.From(model));
        }
        catch (BaseModelRegistry.DuplicateName e)
        {
            return TypedResults.Problem(e.Message, statusCode: 409, title: "Name taken");
        }
    }

    private static async Task<Ok<List<BaseModelDto>>> ListAll(FineTuneDbContext db, CancellationToken ct) =>
        TypedResults.Ok((await db.BaseModels.AsNoTracking().OrderBy(m => m.Name).ToListAsync(ct)).Select(BaseModelDto.From).ToList());

    private static async Task<Results<Ok<BaseModelDto>, ProblemHttpResult>> GetOne(string name, FineTuneDbContext db, CancellationToken ct) =>
        await db.BaseModels.AsNoTracking().FirstOrDefaultAsync(m => m.Name == name, ct) is { } m
            ? TypedResults.Ok(BaseModelDto.From(m)) : NotFound(name);

    private static async Task<Results<NoContent, ProblemHttpResult>> Delete(string name, FineTuneDbContext db, CancellationToken ct)
    {
        var m = await db.BaseModels.FirstOrDefaultAsync(x => x.Name == name, ct);
        if (m is null) return NotFound(name);
        if (m.Source == BaseModel.FromConfig)
            return TypedResults.Problem($"'{name}' comes from the Models configuration; remove it there (it is seeded again at start).",
                statusCode: 409, title: "Configured base model");
        db.BaseModels.Remove(m);
        await db.SaveChangesAsync(ct);
        return TypedResults.NoContent();
    }

    private static async Task<Ok<List<BaseModelSummaryDto>>> ListNames(FineTuneDbContext db, CancellationToken ct) =>
        TypedResults.Ok((await db.BaseModels.AsNoTracking().OrderBy(m => m.Name).ToListAsync(ct)).Select(BaseModelSummaryDto.From).ToList());

    private static ProblemHttpResult NotFound(string name) =>
        TypedResults.Problem($"No base model named '{name}'.", statusCode: 404, title: "Not found");
}
