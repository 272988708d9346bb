using FineTune.Api.BaseModels;
using FineTune.Api.Endpoints;
using FineTune.Api.Infrastructure;
using FineTune.Api.Submission;
using FineTune.Api.Tenancy;
using FineTune.Api.Webhooks;
using FineTune.Domain;
using FineTune.Domain.Datasets;
using FineTune.Domain.Models;
using FineTune.Domain.Remote;
using FineTune.Domain.Dispatch;
using FineTune.Domain.Persistence;
using FineTune.Domain.Tenants;
using Microsoft.AspNetCore.Authentication;
using Microsoft.AspNetCore.Diagnostics.HealthChecks;
using Microsoft.EntityFrameworkCore;
using Microsoft.Extensions.Options;

var builder = WebApplication.CreateBuilder(args);
builder.AddFineTuneLogging();
var connectionString = builder.Configuration.GetConnectionString("Postgres")
    ?? throw new InvalidOperationException("Set ConnectionStrings:Postgres (env ConnectionStrings__Postgres).");

builder.Services.AddFineTuneDb(connectionString);
builder.Services.AddFineTuneDispatch(builder.Configuration, connectionString);
builder.Services.Configure<StorageOptions>(builder.Configuration.GetSection(StorageOptions.Section));
builder.Services.AddSingleton(SubmissionOptions.From(builder.Configuration));
builder.Services.AddSingleton(RemoteOptions.From(builder.Configuration)).AddSingleton<RemoteFetcher>();
builder.Services.AddSingleton(DatasetOptions.From(builder.Configuration));
builder.Services.AddSingleton(sp => new ModelCache(sp.GetRequiredService<IOptions<StorageOptions>>().Value.EffectiveModelCache, sp.GetRequiredService<RemoteFetcher>()));
builder.Services.AddSingleton(sp => new DatasetSource(sp.GetRequiredService<IOptions<StorageOptions>>().Value.EffectiveDataRoots,
    sp.GetRequiredService<RemoteFetcher>(), sp.GetRequiredService<DatasetOptions>().Limits));
builder.Services.AddSingleton<ModelResolver>().AddSingleton<DatasetCheck>().AddSingleton<SubmissionParser>().AddSingleton<BaseModelRegistry>();
builder.Services.ConfigureHttpJsonOptions(o =>
{
    foreach (var c in DomainJson.Options.Converters) o.SerializerOptions.Converters.Add(c);
    o.SerializerOptions.TypeInfoResolverChain.Insert(0, DomainJson.Options.TypeInfoResolver!);
    o.SerializerOptions.AllowOutOfOrderMetadataProperties = true;
});
builder.Services.AddAuthentication(ApiKeyAuthenticationHandler.SchemeName)
    .AddScheme<AuthenticationSchemeOptions, ApiKeyAuthenticationHandler>(ApiKeyAuthenticationHandler.SchemeName, null);
builder.Services.AddFineTuneAuthorization();
builder.Services.AddFineTuneTenancy(builder.Configuration);
builder.Services.AddProblemDetails().AddExceptionHandler<ProblemExceptionHandler>();
builder.Services.AddHealthChecks().AddCheck<DatabaseReadyHealthCheck>("database", tags: ["ready"]);
builder.Services.AddFineTuneOpenApi();

var app = builder.Build();

await DatabaseMigrator.MigrateAsync(connectionString, app.Lifetime.ApplicationStopping);
if (app.Configuration["Bootstrap:ApiKey"] is { Length: > 0 } bootstrapKey)
{
    await using var scope = app.Services.CreateAsyncScope();
    await scope.ServiceProvider.GetRequiredService<FineTuneDbContext>()
        .EnsureTenantKeyAsync(app.Configuration["Bootstrap:Tenant"] ?? "default", bootstrapKey, Roles.Admin, CancellationToken.None);
}
// The Models configuration (name → folder) is seeded into the base-model registry, the one place names resolve.
await app.Services.GetRequiredService<BaseModelRegistry>()
    .SeedAsync(app.Services.GetRequiredService<SubmissionOptions>().Models, app.Lifetime.ApplicationStopping);

app.UseExceptionHandler();
app.UseStatusCodePages();
app.UseRequestLogging();
app.UseSwagger();
app.UseSwaggerUI(o => o.SwaggerEndpoint("/swagger/v1/swagger.json", "Fine-tune API v1"));
app.UseAuthentication();
app.UseAuthorization();

app.MapHealthChecks("/health/live", new HealthCheckOptions { Predicate = _ => false });
app.MapHealthChecks("/health/ready", new HealthCheckOptions { Predicate = c => c.Tags.Contains("ready") });
app.MapFineTunes();
app.MapAdapters();
app.MapTenancy();
app.MapWebhooks();
app.MapBaseModels();

app.Run();

public partial class Program;
